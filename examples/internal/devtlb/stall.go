package devtlb

import "github.com/gomm-dev/gomm/notifier"

// StallRelease is a notifier subscriber whose Release waits: registered
// after a driver, it holds an exiting MM between the drivers' release
// and exit's zap of the address space, the window a driver's test needs
// to show that nothing enters its table after release.
type StallRelease struct {
	Reached chan struct{} // closed when Release is reached
	Resume  chan struct{} // close it to let exit go on
}

// NewStallRelease returns a StallRelease ready to register.
func NewStallRelease() StallRelease {
	return StallRelease{Reached: make(chan struct{}), Resume: make(chan struct{})}
}

// Release implements notifier.Releaser.
func (s StallRelease) Release(notifier.MM) {
	close(s.Reached)
	<-s.Resume
}
