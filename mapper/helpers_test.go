package mapper_test

import (
	"log/slog"

	"github.com/vhostdm/vhostdm/mapper/mappertest"
)

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

func newFuzzSet() *mappertest.Set { return mappertest.NewSet(1<<20, "a", "b", "c") }
