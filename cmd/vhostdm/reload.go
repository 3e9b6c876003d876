package main

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/vhostdm/vhostdm/config"
	"github.com/vhostdm/vhostdm/internal/sdnotify"
)

// summary is the one-line state reported to systemd.
func (d *daemon) summary() string {
	return fmt.Sprintf("serving %d device(s), %d export(s)", len(d.m.Devices()), len(d.ex.List()))
}

// reloadConfig re-reads the configuration file and applies what changed:
// new devices are created, changed tables reloaded (suspend, load, resume:
// the guest's I/O waits, it does not fail), removed devices and exports
// deleted, new or changed exports added, a changed metadata-cache applied
// to the live thin-pool at once. The whole file is validated first
// — schema, every table line and every backing file — so an invalid file
// changes nothing.
func (d *daemon) reloadConfig(path string) error {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	c, err := config.Load(path)
	if err != nil {
		return err
	}
	if _, err := checkDevices(c); err != nil {
		return err
	}
	old := d.cfg
	if c.CephConfig() != old.CephConfig() {
		d.log.Warn("the [ceph] section cannot change while running; restart to apply (rbd: backends keep the connection they have)")
	}
	if c.QMP != old.QMP {
		d.log.Warn("the QMP socket, its owner, group and mode cannot change while running; restart to apply", "socket", c.QMP.Socket)
	}
	oldDev := map[string]config.Device{}
	for _, dc := range old.Devices {
		oldDev[dc.Name] = dc
	}
	newDev := map[string]config.Device{}
	for _, dc := range c.Devices {
		newDev[dc.Name] = dc
		if o, ok := oldDev[dc.Name]; ok && (o.ReadOnly != dc.ReadOnly || o.UUID != dc.UUID) {
			return fmt.Errorf("device %q: readonly and uuid cannot change while running; remove the device first", dc.Name)
		}
	}
	oldExp := map[string]config.Export{}
	for _, e := range old.Exports {
		oldExp[e.ID] = e
	}
	newExp := map[string]config.Export{}
	for _, e := range c.Exports {
		newExp[e.ID] = e
	}
	applyRepagent, err := d.prepareRepagent(old, c)
	if err != nil {
		return err
	}
	applyRepagent()
	var errs []error
	// Exports that went away or changed settings go first.
	for id, e := range oldExp {
		if n, ok := newExp[id]; !ok || !reflect.DeepEqual(n, e) || old.Path(e.Socket) != c.Path(n.Socket) {
			if err := d.ex.Del(id, "hard"); err != nil {
				errs = append(errs, fmt.Errorf("export %q: %w", id, err))
			} else {
				d.log.Info("export removed by reload", "export", id)
			}
		}
	}
	// kept: devices whose change was refused as a whole; the configuration
	// recorded keeps what they are, so the next reload compares with it.
	kept := map[string]config.Device{}
	order, _ := c.DeviceOrder()
	for _, dc := range order {
		o, existed := oldDev[dc.Name]
		switch {
		case !existed:
			if _, err := d.m.CreateTableWith(dc.Name, dc.UUID, dc.Options(), dc.Table); err != nil {
				errs = append(errs, fmt.Errorf("device %q: %w", dc.Name, err))
				continue
			}
			d.log.Info("device created by reload", "device", dc.Name)
		case o.CacheMode != dc.CacheMode:
			errs = append(errs, fmt.Errorf("device %q: cache %s -> %s: a device's cache mode is fixed at creation (remove the device, reload, add it again)",
				dc.Name, o.CacheMode, dc.CacheMode))
			kept[dc.Name] = o
			continue
		case o.LockMode != dc.LockMode:
			errs = append(errs, fmt.Errorf("device %q: locking %s -> %s: a device's image locking is fixed at creation (remove the device, reload, add it again)",
				dc.Name, o.LockMode, dc.LockMode))
			kept[dc.Name] = o
			continue
		default:
			dev, err := d.m.Get(dc.Name)
			if err != nil {
				errs = append(errs, fmt.Errorf("device %q: %w", dc.Name, err))
				continue
			}
			if normalizeTable(o.Table) != normalizeTable(dc.Table) {
				if err := dev.Reload(dc.Table); err != nil {
					errs = append(errs, fmt.Errorf("device %q: %w", dc.Name, err))
					continue
				}
				d.log.Info("table reloaded", "device", dc.Name)
			}
			// Applied at once to the live pool (after a table reload, to
			// the new table: it was built with the option in force).
			if dev.MetadataCache() != dc.MetadataCacheBytes {
				if err := dev.SetMetadataCache(dc.MetadataCacheBytes); err != nil {
					errs = append(errs, fmt.Errorf("device %q: metadata-cache: %w", dc.Name, err))
					continue
				}
				d.log.Info("metadata cache changed by reload", "device", dc.Name, "bytes", dc.MetadataCacheBytes)
			}
		}
	}
	// Devices that went away, users before what they use.
	oldOrder, _ := old.DeviceOrder()
	for _, dc := range slices.Backward(oldOrder) {
		if _, keep := newDev[dc.Name]; keep {
			continue
		}
		if err := d.m.Remove(dc.Name, false); err != nil {
			errs = append(errs, fmt.Errorf("device %q: %w", dc.Name, err))
			continue
		}
		d.log.Info("device removed by reload", "device", dc.Name)
	}
	for _, e := range c.Exports {
		if o, ok := oldExp[e.ID]; ok && reflect.DeepEqual(o, e) && old.Path(o.Socket) == c.Path(e.Socket) {
			continue
		}
		if err := d.ex.Add(exportOptions(c, e)); err != nil {
			errs = append(errs, fmt.Errorf("export %q: %w", e.ID, err))
		}
	}
	for i, dc := range c.Devices {
		if o, ok := kept[dc.Name]; ok {
			c.Devices[i] = o
		}
	}
	d.cfg = c
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	d.log.Info("configuration reloaded", "file", path)
	return nil
}

// qmpReloadConfig is the QMP command reload-config: SIGHUP's reload,
// answering with the error text when the file is invalid.
func (d *daemon) qmpReloadConfig(map[string]string) (any, error) {
	d.reloadMu.Lock()
	file := d.cfg.File
	d.reloadMu.Unlock()
	if file == demoFile {
		return nil, errors.New("the demo has no configuration file to reload")
	}
	sdnotify.Notify(sdnotify.Reloading)
	defer sdnotify.Notify(sdnotify.Ready, sdnotify.Status(d.summary()))
	if err := d.reloadConfig(file); err != nil {
		return nil, err
	}
	return struct{}{}, nil
}

// normalizeTable folds white space and drops blank and comment lines so
// that only real changes of a table count.
func normalizeTable(t string) string {
	var out []string
	for _, l := range strings.Split(t, "\n") {
		f := strings.Fields(l)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") {
			continue
		}
		out = append(out, strings.Join(f, " "))
	}
	return strings.Join(out, "\n")
}
