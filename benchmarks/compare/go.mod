module github.com/gomm-dev/gomm/benchmarks/compare

go 1.26.3

require (
	github.com/gomm-dev/gomm v0.0.0
	github.com/stretchr/testify v1.12.1
	go.uber.org/goleak v1.3.0
	gvisor.dev/gvisor v0.0.0-20260905035102-160fafc42237
)

require (
	go.yaml.in/yaml/v3 v3.0.5 // indirect
	golang.org/x/sys v0.49.0 // indirect
	golang.org/x/time v0.15.0 // indirect
)

replace github.com/gomm-dev/gomm => ../..
