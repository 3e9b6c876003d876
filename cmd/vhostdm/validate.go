package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/vhostdm/vhostdm/ceph"
	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/mapper"
)

func init() {
	register("validate", "check a configuration file and print a summary", runValidate)
}

// runValidate checks a configuration completely — syntax, schema, table
// grammar and the targets' constructors against the real backing files,
// opened read-only — and prints one line per device, or every error.
func runValidate(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("validate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	file := fs.String("c", "", "configuration `FILE`")
	fs.StringVar(file, "config", "", "configuration `FILE` (same as -c)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *file == "" || fs.NArg() != 0 {
		fmt.Fprintln(stderr, "usage: vhostdm validate -c FILE")
		return 2
	}
	c, err := config.Load(*file)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	lines, err := checkDevices(c)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 1
	}
	for _, l := range lines {
		fmt.Fprintln(stdout, l)
	}
	return 0
}

// checkDevices builds every device of c, read-only, in a scratch manager
// and returns a summary line for each, or every error found.
func checkDevices(c *config.Config) ([]string, error) {
	log := slog.New(slog.DiscardHandler)
	rbd := ceph.NewOpener(c.CephConfig(), log)
	defer rbd.Close()
	m := mapper.NewManager(mapper.ManagerOptions{Logger: log, Dir: c.Dir, Schemes: map[string]mapper.OpenFunc{ceph.Scheme: rbd.Open}})
	defer m.Close()
	order, err := c.DeviceOrder()
	if err != nil {
		return nil, err
	}
	var errs []error
	summary := map[string]string{}
	failed := map[string]bool{}
outer:
	for _, d := range order {
		for _, u := range d.Uses() {
			if failed[u] {
				failed[d.Name] = true
				errs = append(errs, fmt.Errorf("%s: device %q not checked: it uses /dev/mapper/%s, which has errors", c.File, d.Name, u))
				continue outer
			}
		}
		dev, err := m.CreateTableWith(d.Name, d.UUID, mapper.DeviceOptions{ReadOnly: true, Cache: d.CacheMode, MetadataCache: d.MetadataCacheBytes}, d.Table)
		if err != nil {
			failed[d.Name] = true
			errs = append(errs, c.TableError(c.DeviceIndex(d.Name), errors.Unwrap(err)))
			continue
		}
		var types []string
		for _, l := range dev.Status(mapper.StatusTable, false) {
			types = append(types, l.Type)
		}
		size := dev.Size()
		summary[d.Name] = fmt.Sprintf("%s: %d sectors (%s), %d target(s): %s%s", d.Name, size,
			humanBytes(size*mapper.SectorSize), len(types), strings.Join(types, ", "), exportsOf(c, d.Name))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	var out []string
	for _, d := range c.Devices {
		out = append(out, summary[d.Name])
	}
	return out, nil
}

func exportsOf(c *config.Config, device string) string {
	var s []string
	for _, e := range c.Exports {
		if e.Device == device {
			mode := "ro"
			if e.Writable {
				mode = "rw"
			}
			if e.Type == config.TypeNBD {
				at := e.Listen
				if at == "" {
					at = c.Path(e.Socket)
				}
				s = append(s, fmt.Sprintf("%s over NBD as %q at %s (%s)", e.ID, e.Name, at, mode))
				continue
			}
			s = append(s, fmt.Sprintf("%s at %s (%s, %d queue(s))", e.ID, c.Path(e.Socket), mode, e.NumQueues))
		}
	}
	if len(s) == 0 {
		return ""
	}
	return "; exported as " + strings.Join(s, ", ")
}

// humanBytes formats n bytes with a binary unit, as "1.0 GiB".
func humanBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
