package mapper_test

import (
	"errors"
	"testing"

	"github.com/vhostdm/vhostdm/mapper"
	"github.com/vhostdm/vhostdm/mapper/mappertest"
	_ "github.com/vhostdm/vhostdm/targets"
)

// TestSchemes: a name SCHEME:REST goes to its scheme's opener whole; a
// name whose prefix is no scheme stays a path.
func TestSchemes(t *testing.T) {
	mem := mappertest.NewMem("x", 1<<20)
	var got []string
	m := mapper.NewManager(mapper.ManagerOptions{Schemes: map[string]mapper.OpenFunc{
		"mem": func(name string, readOnly bool) (mapper.Backend, error) {
			got = append(got, name)
			return mem, nil
		},
	}})
	defer m.Close()
	if _, err := m.CreateTable("a", "", false, "0 8 linear mem:x 0"); err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0] != "mem:x" {
		t.Fatalf("scheme opener called with %q", got)
	}
	_, err := m.CreateTable("b", "", false, "0 8 linear nomem:x 0")
	if !errors.Is(err, mapper.ErrNotFound) {
		t.Fatalf("a name with an unknown scheme: %v; want it opened as a missing file", err)
	}
}
