// Package targets holds vhostdm's device-mapper target types. Each file is
// one target family and registers itself with the mapper registry in init,
// so importing the package (blank import) makes every target available:
//
//	import _ "github.com/vhostdm/vhostdm/targets"
//
// Grammars, status lines and error rules follow the Linux kernel 6.1
// targets (Documentation/admin-guide/device-mapper); where we differ, the
// target's doc comment says so.
package targets
