// Package proto is the contract between the e2e guest's /init
// (test/e2e/guestinit) and the host harness: the kernel command line
// parameters that select workloads, and the result lines the guest prints
// on its serial console.
//
// The guest prints, each as one line written with one write(2):
//
//	VHOSTDM-RESULT-BEGIN {"kernel":"6.1.0-56-amd64","uptime_ms":5120,...}
//	VHOSTDM-RESULT {"step":"verify","disk":"vda","ok":true,"ms":2310,...}
//	...
//	VHOSTDM-RESULT-END {"ok":true,"failed":0}
//
// then powers off. Kernel messages may share the console, so the host looks
// for the markers anywhere in a line.
package proto

// Console markers.
const (
	BeginMarker  = "VHOSTDM-RESULT-BEGIN "
	ResultMarker = "VHOSTDM-RESULT "
	EndMarker    = "VHOSTDM-RESULT-END "
)

// ParamPrefix starts every kernel command line parameter the guest reads.
const ParamPrefix = "vhostdm."

// Kernel command line parameter names (after ParamPrefix).
const (
	// ParamTest lists the steps, comma-separated, each optionally "@disk"
	// (a /sys/block name such as vdb, or a serial): "info,verify@vda".
	// Disks joined by "+" run the step on each of them at once
	// ("writer@vda+vdb"); the next step starts when all are done.
	ParamTest = "test"
	// ParamDisk is the default disk of steps without "@disk" (vda).
	ParamDisk = "disk"
	// ParamDisks is how many virtio disks to wait for before starting (1).
	ParamDisks = "disks"
	// ParamSeed seeds patterns and plans (uint64).
	ParamSeed = "seed"
	// ParamCoverage is the percentage of the disk the verify plan covers (25).
	ParamCoverage = "coverage"
	// ParamMaxBlocks is the longest verify extent in 4 KiB blocks (64).
	ParamMaxBlocks = "maxblocks"
	// ParamDuration is the writer's run time in seconds (20).
	ParamDuration = "duration"
	// ParamQD is the writer's number of concurrent writes (4).
	ParamQD = "qd"
	// ParamFlushEvery is the number of writes between the writer's flushes (32).
	ParamFlushEvery = "flushevery"
	// ParamAcked is, for writercheck, the number of writes a flush covered.
	ParamAcked = "acked"
	// ParamIssued is, for writercheck, the number of writes issued (-1: unknown).
	ParamIssued = "issued"
	// ParamFioRuntime is each fio job's run time in seconds (5).
	ParamFioRuntime = "fioruntime"
	// ParamFioJobs lists fio jobs, comma-separated, from FioJobs (all).
	ParamFioJobs = "fiojobs"
	// ParamResizeTimeout bounds the resize watch, in seconds (60).
	ParamResizeTimeout = "resizetimeout"
	// ParamModules lists the modules to load with their dependencies
	// (virtio_pci,virtio_blk).
	ParamModules = "modules"
	// ParamWatchdog is how many seconds without a result line make the
	// guest dump its blocked tasks (sysrq-w) and block queues to the
	// console, to see where a hung request is; 0 turns it off (default
	// 120).
	ParamWatchdog = "watchdog"
	// ParamIRQChurn is, for fio, the period in milliseconds of the
	// interrupt churn that runs during the jobs (0, off): every period
	// the affinity of each virtio interrupt moves to the next CPU, and
	// CPU 1 goes offline or online (which shuts down and starts again
	// the managed queue interrupts affine to it). Both mask and unmask
	// MSI-X vectors, and QEMU answers each with SET_VRING_CALL. The
	// last fio result carries the counts in Values: irq_moves,
	// irq_move_errors (managed interrupts refuse affinity changes),
	// cpu_toggles and cpu_toggle_errors.
	ParamIRQChurn = "irqchurn"
)

// Steps the guest knows.
const (
	StepInfo        = "info"        // one result per virtio disk: size, serial, queues, limits
	StepVerify      = "verify"      // write the seed's plan with O_DIRECT, fsync, read back and check
	StepReadVerify  = "readverify"  // read the seed's plan and check it (no writes)
	StepFlush       = "flush"       // write a block, fsync and fdatasync
	StepDiscard     = "discard"     // write, BLKDISCARD, read back zeros
	StepZeroes      = "zeroes"      // write, BLKZEROOUT, read back zeros
	StepReadOnly    = "readonly"    // every way of writing must fail
	StepWriter      = "writer"      // long-running verified writer, events "flush" and "ioerror"
	StepWriterCheck = "writercheck" // check the writer's blocks after a fault (acked/issued)
	StepResize      = "resize"      // wait for the capacity to change, then use the new space
	StepFio         = "fio"         // fio jobs (fio/JOB: that one only): per job events "start" (Fio names it) and "end" (as its result), one result each
	StepShell       = "shell"       // exec /bin/sh (busybox) on the console
	StepSleep       = "sleep"       // sleep for the duration parameter
	// StepDiscardWatch discards a range, reports event "ready", then
	// discards it every 100 ms until the kernel logs that the device
	// answered "operation not supported" (the host reloaded the table onto
	// targets that do not discard); an I/O error fails it.
	StepDiscardWatch = "discardwatch"
)

// Fixed extents of the flush, discard and zeroes steps, relative to the
// middle of the disk (rounded down to 1 MiB), so the host can check them.
const (
	FlushOffset   = 0
	FlushLen      = 64 << 10
	DiscardOffset = 1 << 20
	DiscardLen    = 1 << 20
	ZeroesOffset  = 2 << 20
	ZeroesLen     = 1 << 20
)

// MiddleOffset returns the byte offset the fixed extents are relative to.
func MiddleOffset(diskBytes int64) int64 {
	return (diskBytes / 2) &^ (1<<20 - 1)
}

// Begin is the payload of the begin line.
type Begin struct {
	Kernel   string   `json:"kernel"`
	UptimeMS int64    `json:"uptime_ms"` // guest uptime when workloads start
	Disks    []string `json:"disks"`
	Steps    []string `json:"steps"`
	CPUs     int      `json:"cpus"`
}

// Result is the payload of one result line. Streaming steps (writer,
// resize) also print lines with Event set before their final result.
type Result struct {
	Step  string `json:"step"`
	Disk  string `json:"disk,omitempty"`
	Event string `json:"event,omitempty"` // "", "ready", "flush", "ioerror", "progress", "start", "end"
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	MS    int64  `json:"ms"` // wall time of the step (final result) or since its start (event)

	Info   *DiskInfo        `json:"info,omitempty"`
	Fio    *FioJob          `json:"fio,omitempty"`
	Values map[string]int64 `json:"values,omitempty"`
}

// DiskInfo is what the guest's sysfs says about one virtio disk.
type DiskInfo struct {
	Name              string `json:"name"`
	Sectors           int64  `json:"sectors"` // 512-byte sectors
	Serial            string `json:"serial"`
	ReadOnly          bool   `json:"ro"`
	Queues            int    `json:"queues"` // blk-mq hardware queues
	LogicalBlockSize  int    `json:"logical_block_size"`
	PhysicalBlockSize int    `json:"physical_block_size"`
	DiscardMaxBytes   int64  `json:"discard_max_bytes"`
	WriteZeroesMax    int64  `json:"write_zeroes_max_bytes"`
	WriteCache        string `json:"write_cache"`
}

// End is the payload of the end line.
type End struct {
	OK     bool `json:"ok"`
	Failed int  `json:"failed"`
}

// FioJobs are the fio jobs the fio step knows, by name.
var FioJobs = []FioSpec{
	{Name: "randread-4k", RW: "randread", BS: "4k", IODepth: 16},
	{Name: "randwrite-4k", RW: "randwrite", BS: "4k", IODepth: 16},
	{Name: "seqread-1m", RW: "read", BS: "1m", IODepth: 4},
	{Name: "seqwrite-1m", RW: "write", BS: "1m", IODepth: 4},
}

// FioSpec is one fio job.
type FioSpec struct {
	Name    string
	RW      string
	BS      string
	IODepth int
}

// FioJob is the summary of one fio job's JSON output.
type FioJob struct {
	Name     string  `json:"name"`
	Engine   string  `json:"engine"`
	RW       string  `json:"rw"`
	BS       string  `json:"bs"`
	IODepth  int     `json:"iodepth"`
	IOPS     float64 `json:"iops"`
	BWKiBps  int64   `json:"bw_kib_s"`
	LatMeanU float64 `json:"lat_mean_us"`
	LatP99U  float64 `json:"lat_p99_us"`
	Errors   int     `json:"errors"`
	RuntimeS float64 `json:"runtime_s"`
	// Block is what the guest's block layer sent to the disk between the
	// job's events "start" and "end" (fio's ramp time included): the
	// requests the back end served in that window.
	Block BlockStat `json:"block"`
}

// BlockStat counts completed requests and sectors of a guest disk, from
// /sys/block/DISK/stat (after merging and splitting: one count per
// virtio request), and the interrupts of its virtio device's queues,
// from /proc/interrupts (the back end's calls that reached the guest).
type BlockStat struct {
	Reads        int64 `json:"reads"`
	ReadSectors  int64 `json:"read_sectors"`
	Writes       int64 `json:"writes"`
	WriteSectors int64 `json:"write_sectors"`
	Flushes      int64 `json:"flushes"`
	Interrupts   int64 `json:"interrupts"`
}

// Requests returns the number of requests of all kinds.
func (b BlockStat) Requests() int64 { return b.Reads + b.Writes + b.Flushes }

// Sub returns b minus a.
func (b BlockStat) Sub(a BlockStat) BlockStat {
	return BlockStat{Reads: b.Reads - a.Reads, ReadSectors: b.ReadSectors - a.ReadSectors,
		Writes: b.Writes - a.Writes, WriteSectors: b.WriteSectors - a.WriteSectors, Flushes: b.Flushes - a.Flushes,
		Interrupts: b.Interrupts - a.Interrupts}
}
