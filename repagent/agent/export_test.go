package agent

// PaceState returns how many writers of volume name wait in a pacing
// episode, and how many times paced writers have woken.
func PaceState(a *Agent, name string) (waiting int, wakes uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	v := a.vols[name]
	return v.paced, v.paceWakes
}
