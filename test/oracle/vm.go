// Package oracle runs the real Linux device-mapper as a reference for
// vhostdm's targets: Debian's kernel (linux-image-amd64) boots in a QEMU TCG
// guest from a small initramfs holding busybox-static, dmsetup and the dm
// modules, runs a shell script against virtio disks that are plain files on
// the host, and powers off. Nothing is installed or kept: the initramfs is
// built in a temporary directory at run time from the host's own files.
//
// It also holds the golden-file format shared by the targets' tests (see
// [ParseGolden]): each case is a table or a message, the kernel's answer
// recorded by this package (`go test ./test/oracle -record`), and the
// vhostdm answer the targets' tests check against it.
//
// Requirements (scripts/setup.sh installs them): qemu-system-x86,
// linux-image-amd64, busybox-static, dmsetup, cpio and kmod (modprobe). A
// missing one is an error that names the package.
package oracle

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// Guest is a bootable kernel and initramfs, built by [NewGuest].
type Guest struct {
	Kernel  string // path of vmlinuz
	Release string // uname -r of the kernel
	dir     string // work directory holding base.gz
}

// Modules are the kernel modules the guest loads at boot, in order; their
// dependencies come along through modprobe.
var Modules = []string{
	"virtio_pci", "virtio_blk", "dm-mod", "dm-zero", "dm-crypt", "dm-flakey", "dm-delay",
	"dm-multipath", "dm-round-robin", "dm-queue-length", "dm-service-time",
	"xts", "essiv", "ecb", "aesni_intel",
}

// need returns the path of an executable or an error telling how to get it.
func need(name, pkg string) (string, error) {
	for _, dir := range []string{"", "/usr/sbin/", "/sbin/", "/usr/bin/", "/bin/"} {
		p := dir + name
		if dir == "" {
			if lp, err := exec.LookPath(name); err == nil {
				return lp, nil
			}
			continue
		}
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("oracle: %s not found: install Debian package %s (apt-get install -y %s, or scripts/setup.sh)", name, pkg, pkg)
}

// NewGuest builds the base initramfs in dir (a temporary directory the
// caller removes). It needs the host's kernel image and its modules.
func NewGuest(dir string) (*Guest, error) {
	kernels, _ := filepath.Glob("/boot/vmlinuz-*")
	if len(kernels) == 0 {
		return nil, errors.New("oracle: no /boot/vmlinuz-*: install Debian package linux-image-amd64")
	}
	g := &Guest{Kernel: kernels[len(kernels)-1], dir: dir}
	g.Release = strings.TrimPrefix(filepath.Base(g.Kernel), "vmlinuz-")
	if _, err := os.Stat("/lib/modules/" + g.Release + "/modules.dep"); err != nil {
		return nil, fmt.Errorf("oracle: modules of kernel %s missing: install Debian package linux-image-amd64", g.Release)
	}
	for _, t := range [][2]string{{"qemu-system-x86_64", "qemu-system-x86"}, {"cpio", "cpio"}, {"modprobe", "kmod"}, {"dmsetup", "dmsetup"}, {"busybox", "busybox-static"}} {
		if _, err := need(t[0], t[1]); err != nil {
			return nil, err
		}
	}
	bb, _ := need("busybox", "busybox-static")
	if out, err := exec.Command("file", "-L", bb).Output(); err == nil && !bytes.Contains(out, []byte("statically linked")) {
		return nil, fmt.Errorf("oracle: %s is not static: install Debian package busybox-static", bb)
	}
	cmd := exec.Command("bash", "-euc", buildScript, "build", dir, g.Release, strings.Join(Modules, " "), bb)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("oracle: building initramfs: %v\n%s", err, out)
	}
	return g, nil
}

// buildScript makes $1/base.gz for kernel $2 with modules $3 and busybox $4.
const buildScript = `
W=$1; K=$2; MODS=$3; BB=$4; R=$W/root
mkdir -p $R/bin $R/sbin $R/proc $R/sys $R/dev $R/etc $R/tmp $R/lib/modules/$K
cd $R
cp $BB bin/busybox
for a in sh mount modprobe insmod poweroff cat echo ls dd sleep seq md5sum sha256sum sync dmesg blockdev head tail tr printf grep sed cut wc hexdump od cmp true false test expr; do ln -sf busybox bin/$a; done
ln -sf ../bin/busybox sbin/modprobe
cp /lib/modules/$K/modules.* lib/modules/$K/
for m in $MODS; do modprobe -S $K --show-depends $m | awk '/^insmod/{print $2}'; done | sort -u |
while read f; do mkdir -p .$(dirname $f); cp $f .$f; done
D=$(command -v dmsetup || echo /usr/sbin/dmsetup); cp $D sbin/dmsetup
for l in $(ldd $D | grep -o '/[^ ]*'); do mkdir -p .$(dirname $l); cp -L $l .$l; done
cat > init <<EOF
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $MODS; do modprobe \$m 2>/dev/null; done
echo 1 > /proc/sys/kernel/printk_ratelimit_burst 2>/dev/null
echo "=== guest kernel \$(uname -r)"
[ -x /test.sh ] && /test.sh 2>&1
echo "=== done"; sync; poweroff -f
EOF
chmod +x init
find . | cpio -o -H newc --quiet | gzip -1 > $W/base.gz
`

// Run boots the guest with script as /test.sh and the files disks as
// virtio disks vdb, vdc, ... (vda is unused: the first disk is vdb, the
// kernel's 254:16, so that device numbers in scripts stay stable), and
// returns what the script printed. The guest is one CPU, TCG, 512 MiB.
func (g *Guest) Run(ctx context.Context, script string, disks []string) (string, error) {
	qemu, err := need("qemu-system-x86_64", "qemu-system-x86")
	if err != nil {
		return "", err
	}
	t, err := os.MkdirTemp(g.dir, "run")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(t)
	if err := os.WriteFile(filepath.Join(t, "test.sh"), []byte("#!/bin/sh\n"+script), 0o755); err != nil {
		return "", err
	}
	pack := exec.Command("bash", "-euc", `cd $1 && echo test.sh | cpio -o -H newc --quiet | gzip -1 > t.gz && cat $2 t.gz > initrd.gz`, "pack", t, filepath.Join(g.dir, "base.gz"))
	if out, err := pack.CombinedOutput(); err != nil {
		return "", fmt.Errorf("oracle: packing script: %v\n%s", err, out)
	}
	// A small blank vda keeps the test disks at vdb, vdc, ...
	blank := filepath.Join(t, "vda.img")
	if err := os.WriteFile(blank, make([]byte, 1<<20), 0o644); err != nil {
		return "", err
	}
	// maxcpus=2: with max_cpus 1 TCG translates the guest's LOCK-prefixed
	// barriers (smp_mb in virtio_ring) without host barriers, and QEMU's
	// own virtio-blk, on the main loop thread, can then miss a kick or the
	// guest an interrupt (see harness.Env.QEMUArgs in test/e2e).
	args := []string{"-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "cpus=1,maxcpus=2", "-nographic", "-no-reboot",
		"-kernel", g.Kernel, "-initrd", filepath.Join(t, "initrd.gz"),
		// no_timer_check: a TCG guest on a loaded host can miss the
		// kernel's IO-APIC timer check and panic at boot.
		"-append", "console=ttyS0 quiet panic=-1 loglevel=4 no_timer_check",
		"-drive", "file=" + blank + ",format=raw,if=virtio,cache=unsafe"}
	for _, d := range disks {
		// file.locking=off: the test's own mapper devices may hold
		// the images open, with QEMU's image locks, while the kernel
		// looks at them.
		args = append(args, "-drive", "file="+d+",format=raw,if=virtio,cache=unsafe,file.locking=off")
	}
	cmd := exec.CommandContext(ctx, qemu, args...)
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	text := strings.ReplaceAll(out.String(), "\r\n", "\n")
	i := strings.Index(text, "=== guest kernel")
	j := strings.LastIndex(text, "=== done")
	if i < 0 || j < i {
		if err == nil {
			err = errors.New("guest did not finish its script")
		}
		tail := text
		if len(tail) > 4000 {
			tail = tail[len(tail)-4000:]
		}
		return "", fmt.Errorf("oracle: qemu: %v\n%s", err, tail)
	}
	return consoleNoise.ReplaceAllString(text[i:j], ""), nil
}

// consoleNoise matches kernel messages printed to the console among the
// script's output.
var consoleNoise = regexp.MustCompile(`(?m)^\[\s*\d+\.\d+\] .*\n`)
