package mapper

import (
	"fmt"
	"slices"
	"sync"
)

// Registry holds plug-ins of one class (target types, dirty logs, path
// selectors, replication logs, site links) by name. It is the seed's
// dm-registry: one mechanism for every class. Registration happens in init
// functions; lookups may run concurrently with each other and with Register.
type Registry[T any] struct {
	class string

	mu sync.RWMutex
	m  map[string]T
}

// NewRegistry returns an empty registry for plug-ins of the named class; the
// class appears in errors ("unknown target type \"foo\"").
func NewRegistry[T any](class string) *Registry[T] {
	return &Registry[T]{class: class, m: make(map[string]T)}
}

// Register adds v under name. An empty or duplicate name is a programmer
// error and panics: registration happens at init time, never from input.
func (r *Registry[T]) Register(name string, v T) {
	if name == "" {
		panic(fmt.Sprintf("mapper: register %s with empty name", r.class))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, dup := r.m[name]; dup {
		panic(fmt.Sprintf("mapper: %s %q registered twice", r.class, name))
	}
	r.m[name] = v
}

// Lookup returns the plug-in registered under name, or an error wrapping
// ErrNotFound that names the class and the name.
func (r *Registry[T]) Lookup(name string) (T, error) {
	r.mu.RLock()
	v, ok := r.m[name]
	r.mu.RUnlock()
	if !ok {
		var zero T
		return zero, Errorf(ErrNotFound, "unknown %s %q", r.class, name)
	}
	return v, nil
}

// Names returns the registered names in sorted order.
func (r *Registry[T]) Names() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	names := make([]string, 0, len(r.m))
	for n := range r.m {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}
