package harness

import (
	"fmt"
	"strings"
)

// ParseConsole reads the result lines of a guest console captured
// elsewhere (a libvirt domain's serial log, say) into a Run. It fails on a
// malformed result line; a console without the guest's end line is an
// incomplete Run with End nil.
func ParseConsole(text string) (*Run, error) {
	run := &Run{}
	for _, line := range strings.Split(text, "\n") {
		ev, ok := parseLine(strings.TrimRight(line, "\r"))
		if !ok {
			continue
		}
		if ev.Err != nil {
			return run, fmt.Errorf("malformed guest output: %w", ev.Err)
		}
		run.Events = append(run.Events, ev)
		switch ev.Kind {
		case EventBegin:
			run.Begin = ev.Begin
		case EventResult:
			if ev.Result.Event == "" {
				run.Results = append(run.Results, *ev.Result)
			}
		case EventEnd:
			run.End = ev.End
		}
	}
	return run, nil
}
