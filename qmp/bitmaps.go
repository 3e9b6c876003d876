package qmp

import (
	"fmt"
	"net"

	"github.com/vhostdm/vhostdm/mapper"
)

// bitmapCommands are QEMU's dirty bitmap commands on mapper devices (the
// node is the device name) and the block node queries that report them.
func bitmapCommands() []*command {
	node := req("node", kString)
	name := req("name", kString)
	return []*command{
		{name: "block-dirty-bitmap-add", mutates: true, params: []param{node, name, opt("granularity", kUint64), opt("persistent", kBool), opt("disabled", kBool)}, run: cmdBitmapAdd},
		{name: "block-dirty-bitmap-remove", mutates: true, params: []param{node, name}, run: bitmapOp((*mapper.Device).RemoveBitmap)},
		{name: "block-dirty-bitmap-clear", mutates: true, params: []param{node, name}, run: bitmapOp((*mapper.Device).ClearBitmap)},
		{name: "block-dirty-bitmap-enable", mutates: true, params: []param{node, name}, run: bitmapOp((*mapper.Device).EnableBitmap)},
		{name: "block-dirty-bitmap-disable", mutates: true, params: []param{node, name}, run: bitmapOp((*mapper.Device).DisableBitmap)},
		{name: "block-dirty-bitmap-merge", mutates: true, params: []param{node, req("target", kString), req("bitmaps", kStrings)}, run: cmdBitmapMerge},
		{name: "nbd-server-start", mutates: true, params: []param{
			{name: "addr", kind: kObject, sub: []param{
				{name: "type", kind: kString, enum: []string{"unix", "inet"}},
				opt("path", kString), opt("host", kString), opt("port", kString),
			}},
			opt("tls-creds", kString), opt("tls-verify-peer", kBool),
		}, run: cmdNBDServerStart},
		{name: "nbd-server-stop", mutates: true, run: cmdNBDServerStop},
		{name: "query-block", run: cmdQueryBlock},
		{name: "query-named-block-nodes", params: []param{opt("flat", kBool)}, run: cmdQueryNodes},
	}
}

// bitmapNode returns the device a bitmap command names, with QEMU's text.
func (c *client) bitmapNode(node string) (*mapper.Device, error) {
	d, err := c.s.cfg.Manager.Get(node)
	if err != nil {
		return nil, genericf("Cannot find device='%s' nor node-name='%s'", node, node)
	}
	return d, nil
}

// bitmapErr passes the mapper's QEMU-worded errors on as GenericError.
func bitmapErr(err error) error {
	if err == nil {
		return nil
	}
	return genericf("%s", err.Error())
}

func cmdBitmapAdd(c *client, a args) (any, error) {
	d, err := c.bitmapNode(a.str("node"))
	if err != nil {
		return nil, err
	}
	if a.has("granularity") && a.uint("granularity") == 0 {
		return nil, genericf("Granularity must be power of 2 between 512 and 2147483648")
	}
	_, err = d.AddBitmap(mapper.BitmapOptions{Name: a.str("name"), Granularity: a.uint("granularity"),
		Persistent: a.flag("persistent"), Disabled: a.flag("disabled")})
	if err != nil {
		return nil, bitmapErr(err)
	}
	return empty, nil
}

func bitmapOp(fn func(d *mapper.Device, name string) error) func(c *client, a args) (any, error) {
	return func(c *client, a args) (any, error) {
		d, err := c.bitmapNode(a.str("node"))
		if err != nil {
			return nil, err
		}
		if err := fn(d, a.str("name")); err != nil {
			return nil, bitmapErr(err)
		}
		return empty, nil
	}
}

func cmdBitmapMerge(c *client, a args) (any, error) {
	d, err := c.bitmapNode(a.str("node"))
	if err != nil {
		return nil, err
	}
	if err := d.MergeBitmaps(a.str("target"), a.list("bitmaps")); err != nil {
		return nil, bitmapErr(err)
	}
	return empty, nil
}

// blockNode is the part of QEMU's BlockDeviceInfo that a mapper device has.
type blockNode struct {
	NodeName     string              `json:"node-name"`
	Drv          string              `json:"drv"`
	RO           bool                `json:"ro"`
	File         string              `json:"file"`
	Image        blockImage          `json:"image"`
	DirtyBitmaps []mapper.BitmapInfo `json:"dirty-bitmaps"`
}

type blockImage struct {
	Filename    string `json:"filename"`
	Format      string `json:"format"`
	VirtualSize uint64 `json:"virtual-size"`
}

func nodeOf(d *mapper.Device) blockNode {
	n := blockNode{NodeName: d.Name(), Drv: "vhostdm", RO: d.ReadOnly(), File: mapper.MapperDir + d.Name(),
		Image:        blockImage{Filename: mapper.MapperDir + d.Name(), Format: "vhostdm", VirtualSize: d.Size() << mapper.SectorShift},
		DirtyBitmaps: []mapper.BitmapInfo{}}
	for _, b := range d.Bitmaps() {
		n.DirtyBitmaps = append(n.DirtyBitmaps, b.Info())
	}
	return n
}

func cmdQueryNodes(c *client, a args) (any, error) {
	out := []blockNode{}
	for _, d := range c.s.cfg.Manager.Devices() {
		out = append(out, nodeOf(d))
	}
	return out, nil
}

// blockInfo is QEMU's BlockInfo for a device: the device is its own node.
type blockInfo struct {
	Device    string    `json:"device"`
	Qdev      string    `json:"qdev"`
	Locked    bool      `json:"locked"`
	Removable bool      `json:"removable"`
	Type      string    `json:"type"`
	Inserted  blockNode `json:"inserted"`
}

func cmdQueryBlock(c *client, a args) (any, error) {
	out := []blockInfo{}
	for _, d := range c.s.cfg.Manager.Devices() {
		out = append(out, blockInfo{Device: d.Name(), Type: "unknown", Inserted: nodeOf(d)})
	}
	return out, nil
}

// exportAddNBD finishes block-export-add for type nbd.
func exportAddNBD(c *client, ex Exports, a args, o ExportOptions) (any, error) {
	for _, k := range []string{"num-queues", "logical-block-size", "serial"} {
		if a.has(k) {
			return nil, genericf("Parameter '%s' is unexpected", k)
		}
	}
	ad := a.obj("addr")
	if !a.has("addr") {
		// QSD's form: the export joins the server of nbd-server-start.
		if _, ok := ex.(NBDServer); !ok {
			return nil, genericf("NBD server not running")
		}
	}
	if a.has("addr") {
		if err := addrOf(ad, &o); err != nil {
			return nil, err
		}
	} else if a.has("tls-creds") || a.has("tls-verify-peer") {
		return nil, genericf("tls-creds belongs to nbd-server-start for exports without addr")
	}
	o.Name, o.Description, o.Bitmaps, o.TLSCreds = a.str("name"), a.str("description"), a.list("bitmaps"), a.str("tls-creds")
	o.TLSNoVerifyPeer = a.has("tls-verify-peer") && !a.flag("tls-verify-peer")
	if !a.has("name") {
		o.Name = o.NodeName
	}
	if len(o.Name) > 4096 {
		return nil, genericf("export name '%s...' too long", o.Name[:64])
	}
	if len(o.Description) > 4096 {
		return nil, genericf("description '%s...' too long", o.Description[:64])
	}
	d, err := c.s.cfg.Manager.Get(o.NodeName)
	if err != nil {
		return nil, genericf("Cannot find device='' nor node-name='%s'", o.NodeName)
	}
	if o.Writable && d.ReadOnly() {
		return nil, genericf("Cannot export read-only node as writable")
	}
	if err := ex.Add(o); err != nil {
		return nil, fmt.Errorf("block-export-add %s: %w", o.ID, err)
	}
	return empty, nil
}

// NBDServer is implemented by an Exports that can run QSD's default NBD
// server: nbd-server-start listens, and block-export-add of type nbd
// without addr adds exports to it; nbd-server-stop removes them and stops
// listening.
type NBDServer interface {
	// NBDServerStart listens on o.Socket or o.Listen with o's TLS
	// settings (the other fields are unused).
	NBDServerStart(o ExportOptions) error
	// NBDServerStop removes the exports of the default server and stops
	// it; it returns their ids.
	NBDServerStop() ([]string, error)
}

// addrOf fills o's address from an addr argument.
func addrOf(ad args, o *ExportOptions) error {
	switch ad.str("type") {
	case "unix":
		if ad.has("host") || ad.has("port") || ad.str("path") == "" {
			return genericf("addr of type unix takes a non-empty path only")
		}
		o.Socket = ad.str("path")
	case "inet":
		if ad.has("path") || ad.str("host") == "" || ad.str("port") == "" {
			return genericf("addr of type inet takes host and port")
		}
		o.Listen = net.JoinHostPort(ad.str("host"), ad.str("port"))
	}
	return nil
}

func cmdNBDServerStart(c *client, a args) (any, error) {
	ex, err := c.exports()
	if err != nil {
		return nil, err
	}
	ns, ok := ex.(NBDServer)
	if !ok {
		return nil, genericf("NBD exports are not available in this daemon")
	}
	var o ExportOptions
	if err := addrOf(a.obj("addr"), &o); err != nil {
		return nil, err
	}
	o.TLSCreds = a.str("tls-creds")
	o.TLSNoVerifyPeer = a.has("tls-verify-peer") && !a.flag("tls-verify-peer")
	if err := ns.NBDServerStart(o); err != nil {
		return nil, genericf("%s", err.Error())
	}
	return empty, nil
}

func cmdNBDServerStop(c *client, a args) (any, error) {
	ex, err := c.exports()
	if err != nil {
		return nil, err
	}
	ns, ok := ex.(NBDServer)
	if !ok {
		return nil, genericf("NBD server not running")
	}
	ids, err := ns.NBDServerStop()
	if err != nil {
		return nil, genericf("%s", err.Error())
	}
	for _, id := range ids {
		c.s.Emit(EventBlockExportDeleted, map[string]string{"id": id})
	}
	return empty, nil
}
