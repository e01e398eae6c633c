module stowage.local/hostpath-workalike

go 1.24

require (
	github.com/container-storage-interface/spec v1.12.0
	google.golang.org/grpc v1.82.0
)
