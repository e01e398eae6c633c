// A stand-in for csi-driver-host-path's CreateVolume/DeleteVolume path, used by `make bench`
// only when the Go module proxy does not serve csi-driver-host-path itself. Written for Stowage
// (not copied from hostpath); it does per call what hostpathplugin does for a mount volume:
// one driver-wide mutex, a directory per volume under --statedir, and the whole state rewritten
// as one JSON file after every change. Identity and the Node info calls exist so the same client
// can drive it; everything else is UNIMPLEMENTED.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

type volume struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	Size int64  `json:"size"`
	Path string `json:"path"`
}

type driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer
	csi.UnimplementedNodeServer
	mu        sync.Mutex
	stateDir  string
	stateFile string
	nodeID    string
	volumes   []volume
}

func (d *driver) dump() error {
	data, err := json.Marshal(d.volumes)
	if err != nil {
		return err
	}
	return os.WriteFile(d.stateFile, data, 0o600)
}

func (d *driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: "hostpath-workalike.stowage.csi.io", VendorVersion: "0.1.0"}, nil
}

func (d *driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{{
		Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{
			Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}},
	}}}, nil
}

func (d *driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

func (d *driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{{
		Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{
			Type: csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME}},
	}}}, nil
}

func newID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func (d *driver) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "name missing")
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume capabilities missing")
	}
	size := req.GetCapacityRange().GetRequiredBytes()
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, v := range d.volumes {
		if v.Name == req.GetName() {
			if v.Size != size {
				return nil, status.Error(codes.AlreadyExists, "different size")
			}
			return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: v.ID, CapacityBytes: v.Size}}, nil
		}
	}
	id := newID()
	path := filepath.Join(d.stateDir, id)
	if err := os.MkdirAll(path, 0o777); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	d.volumes = append(d.volumes, volume{ID: id, Name: req.GetName(), Size: size, Path: path})
	if err := d.dump(); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: id, CapacityBytes: size}}, nil
}

func (d *driver) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id missing")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, v := range d.volumes {
		if v.ID == req.GetVolumeId() {
			if err := os.RemoveAll(v.Path); err != nil {
				return nil, status.Error(codes.Internal, err.Error())
			}
			d.volumes = append(d.volumes[:i], d.volumes[i+1:]...)
			if err := d.dump(); err != nil {
				return nil, status.Error(codes.Internal, err.Error())
			}
			break
		}
	}
	return &csi.DeleteVolumeResponse{}, nil
}

func (d *driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.nodeID}, nil
}

func (d *driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	return &csi.NodeGetCapabilitiesResponse{}, nil
}

func main() {
	endpoint := flag.String("endpoint", "unix:///tmp/csi.sock", "CSI endpoint (unix://path)")
	nodeID := flag.String("nodeid", "", "node id")
	stateDir := flag.String("statedir", "/csi-data-dir", "directory for volumes and state")
	flag.String("drivername", "", "accepted for hostpathplugin compatibility; ignored")
	flag.Parse()
	if !strings.HasPrefix(*endpoint, "unix://") {
		log.Fatalf("only unix:// endpoints are supported, got %q", *endpoint)
	}
	sock := strings.TrimPrefix(*endpoint, "unix://")
	if err := os.MkdirAll(*stateDir, 0o750); err != nil {
		log.Fatal(err)
	}
	d := &driver{stateDir: *stateDir, stateFile: filepath.Join(*stateDir, "state.json"), nodeID: *nodeID}
	if err := d.dump(); err != nil {
		log.Fatal(err)
	}
	_ = os.Remove(sock)
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer()
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterControllerServer(srv, d)
	csi.RegisterNodeServer(srv, d)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sigs; srv.GracefulStop() }()
	fmt.Fprintf(os.Stderr, "hostpath-workalike listening on %s\n", sock)
	if err := srv.Serve(lis); err != nil {
		log.Fatal(err)
	}
}
