package targets_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

func TestConformance(t *testing.T) {
	mappertest.RunTarget(t, "linear", mappertest.TargetCase{
		Backends: 1, BackendBytes: 1 << 20, Stores: true, ZeroesOnDiscard: true,
		Table: func(b []string) string { return fmt.Sprintf("0 1000 linear %s 48", b[0]) },
	})
	mappertest.RunTarget(t, "linear-multi", mappertest.TargetCase{
		Backends: 2, BackendBytes: 1 << 20, Stores: true, ZeroesOnDiscard: true,
		Table: func(b []string) string {
			return fmt.Sprintf("0 300 linear %s 0\n300 700 linear %s 5\n1000 24 linear %s 1000", b[0], b[1], b[0])
		},
	})
	mappertest.RunTarget(t, "striped", mappertest.TargetCase{
		Backends: 3, BackendBytes: 1 << 20, Stores: true, ZeroesOnDiscard: true,
		Table: func(b []string) string {
			return fmt.Sprintf("0 1536 striped 3 16 %s 0 %s 8 %s 16", b[0], b[1], b[2])
		},
	})
	mappertest.RunTarget(t, "zero", mappertest.TargetCase{
		Table: func([]string) string { return "0 512 zero" },
	})
}

func TestCryptRunTarget(t *testing.T) {
	key := strings.Repeat("0123456789abcdef", 4)
	mappertest.RunTarget(t, "crypt-xts", mappertest.TargetCase{
		Backends: 1, BackendBytes: 1 << 20, Stores: true, InitialUnknown: true,
		Table: func(b []string) string {
			return "0 2048 crypt aes-xts-plain64 " + key + " 0 " + b[0] + " 0 1 allow_discards"
		},
	})
	mappertest.RunTarget(t, "crypt-4k-two-lines", mappertest.TargetCase{
		Backends: 1, BackendBytes: 1 << 20, Stores: true, InitialUnknown: true, Align: 8,
		Table: func(b []string) string {
			return "0 1024 crypt aes-xts-plain64 " + key + " 0 " + b[0] + " 0 1 sector_size:4096\n" +
				"1024 1024 crypt aes-cbc-essiv:sha256 " + key[:32] + " 7 " + b[0] + " 1024"
		},
	})
}
