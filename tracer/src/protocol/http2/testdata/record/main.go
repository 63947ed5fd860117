// Records one grpc-go connection over h2c on 127.0.0.1 through a recording TCP relay and
// writes it to the file named by the first argument: records of a direction byte ('C' client
// to server, 'S' server to client), a big-endian u32 length and the bytes of one read, in the
// order the relay read them. Regenerate with `go mod tidy && go run . ../grpc_health.bin`.
package main

import (
	"context"
	"encoding/binary"
	"log"
	"net"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type recorder struct {
	mu  sync.Mutex
	out []byte
}

func (r *recorder) add(dir byte, b []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var l [4]byte
	binary.BigEndian.PutUint32(l[:], uint32(len(b)))
	r.out = append(r.out, dir)
	r.out = append(r.out, l[:]...)
	r.out = append(r.out, b...)
}

func pump(dst, src net.Conn, dir byte, rec *recorder, done *sync.WaitGroup) {
	defer done.Done()
	buf := make([]byte, 64*1024)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			rec.add(dir, buf[:n])
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if tc, ok := dst.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
			return
		}
	}
}

func main() {
	srvLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	go gs.Serve(srvLn)

	relayLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	rec := &recorder{}
	var pumps sync.WaitGroup
	go func() {
		c, err := relayLn.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", srvLn.Addr().String())
		if err != nil {
			log.Fatal(err)
		}
		pumps.Add(2)
		go pump(s, c, 'C', rec, &pumps)
		go pump(c, s, 'S', rec, &pumps)
	}()

	conn, err := grpc.NewClient(relayLn.Addr().String(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUserAgent("difytrace-fixture"))
	if err != nil {
		log.Fatal(err)
	}
	client := healthpb.NewHealthClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	md := metadata.Pairs(
		"authorization", "Bearer fixture-secret-token",
		"traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
	octx := metadata.NewOutgoingContext(ctx, md)

	// Unary, twice (the second reuses the dynamic table), then a trailers-only NOT_FOUND.
	for i := 0; i < 2; i++ {
		if _, err := client.Check(octx, &healthpb.HealthCheckRequest{Service: ""}); err != nil {
			log.Fatal(err)
		}
	}
	_, err = client.Check(octx, &healthpb.HealthCheckRequest{Service: "no.such.Service"})
	if status.Code(err) != codes.NotFound {
		log.Fatalf("want NotFound, got %v", err)
	}

	// Server streaming: the current status, then two changes; then the client cancels.
	wctx, wcancel := context.WithCancel(octx)
	w, err := client.Watch(wctx, &healthpb.HealthCheckRequest{Service: ""})
	if err != nil {
		log.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := w.Recv(); err != nil {
			log.Fatal(err)
		}
		switch i {
		case 0:
			hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
		case 1:
			hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
		}
	}
	wcancel()
	time.Sleep(200 * time.Millisecond)

	conn.Close()
	pumps.Wait()
	gs.Stop()
	if err := os.WriteFile(os.Args[1], rec.out, 0o644); err != nil {
		log.Fatal(err)
	}
}
