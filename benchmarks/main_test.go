package benchmarks

import (
	"testing"

	"github.com/gomm-dev/gomm/internal/testmain"
)

func TestMain(m *testing.M) { testmain.Run(m) }
