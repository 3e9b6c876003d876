package mappertest

import (
	"fmt"
	"sync"

	"github.com/vhostdm/vhostdm/mapper"
)

// Marked is a Mem that keeps marks of its contents (a mapper.Marker), as
// an rbd: image keeps snapshots: Mark flushes and copies the durable
// contents under a tag, ChangedSince compares with the copy and drops it.
// MarkErr, when set, fails Mark; Marked and Dropped count the marks made
// and those compared.
type Marked struct {
	*Mem

	mu      sync.Mutex
	marks   map[string]markCopy // by tag
	seq     int
	MarkErr error
	Marked  int // marks made
	Dropped int // marks compared and dropped
}

type markCopy struct {
	token string
	data  []byte
}

var _ mapper.Marker = (*Marked)(nil)

// NewMarked returns a zero-filled Marked of size bytes.
func NewMarked(name string, size int) *Marked {
	return &Marked{Mem: NewMem(name, size), marks: map[string]markCopy{}}
}

// Mark implements mapper.Marker.
func (m *Marked) Mark(tag string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.MarkErr != nil {
		return "", m.MarkErr
	}
	if err := m.Flush(); err != nil {
		return "", err
	}
	m.seq++
	c := markCopy{token: fmt.Sprintf("%s#%d", tag, m.seq), data: m.Bytes()}
	m.marks[tag] = c
	m.Marked++
	return c.token, nil
}

// ChangedSince implements mapper.Marker: it counts the bytes that differ.
func (m *Marked) ChangedSince(token string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for tag, c := range m.marks {
		if c.token != token {
			continue
		}
		delete(m.marks, tag)
		m.Dropped++
		now, n := m.Bytes(), 0
		for i := range now {
			if now[i] != c.data[i] {
				n++
			}
		}
		if n == 0 {
			return "", nil
		}
		return fmt.Sprintf("%s: %d bytes differ from the mark", m.Name(), n), nil
	}
	return fmt.Sprintf("%s: the mark %s is gone", m.Name(), token), nil
}

// ForgetMarks drops every mark, as a snapshot removed behind the
// daemon's back.
func (m *Marked) ForgetMarks() {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.marks)
}

// Held returns how many marks are held.
func (m *Marked) Held() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.marks)
}
