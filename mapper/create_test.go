package mapper_test

import (
	"errors"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
)

// failResume is a target whose Resume fails: a table that loads but cannot
// go live.
type failResume struct{}

var errResume = errors.New("resume refused")

func (failResume) Map(*mapper.Request) error       { return nil }
func (failResume) Status(mapper.StatusKind) string { return "" }
func (failResume) Close() error                    { return nil }
func (failResume) Presuspend(bool) error           { return nil }
func (failResume) Resume() error                   { return errResume }

func init() {
	mapper.RegisterTarget(&mapper.TargetType{Name: "test-fail-resume", Version: [3]int{1, 0, 0},
		New: func(*mapper.Ctx, []string) (mapper.Target, error) { return failResume{}, nil }})
}

// TestCreateTableResumeFails: dmsetup create fails as a whole when the
// table cannot be resumed, and leaves no device behind.
func TestCreateTableResumeFails(t *testing.T) {
	m := mapper.NewManager(mapper.ManagerOptions{Logger: discard()})
	_, err := m.CreateTable("bad", "", false, "0 8 test-fail-resume")
	if !errors.Is(err, errResume) {
		t.Fatalf("CreateTable over a table whose resume fails: %v, want %v", err, errResume)
	}
	if _, err := m.Get("bad"); !errors.Is(err, mapper.ErrNotFound) {
		t.Fatalf("device left behind after a failed create: %v", err)
	}
	if _, err := m.CreateTable("bad", "", false, "0 8 zero"); err != nil {
		t.Fatalf("the name is free again: %v", err)
	}
}
