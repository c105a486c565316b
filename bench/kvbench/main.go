// Command kvbench drives one KV workload against either a Granary KV endpoint (HTTP,
// SigV4) or an etcd cluster (gRPC, the official v3 client), so both are measured by the
// same client code: put, get or cas on random keys, fixed concurrency and duration.
// It prints one JSON line: ops/s, p50 and p99 latency, errors.
//
// etcd's own benchmark tool lives in the root module go.etcd.io/etcd/v3, which the Go
// module proxy here refuses; this tool uses go.etcd.io/etcd/client/v3 instead.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// A store the workload runs against: put returns the new version (Granary) or mod
// revision (etcd) of the key, cas writes only if the key is still at `version`.
type store interface {
	put(ctx context.Context, key string, val []byte) (int64, error)
	get(ctx context.Context, key string) error
	cas(ctx context.Context, key string, val []byte, version int64) (int64, error)
}

type granary struct {
	base   string
	spread int // namespaces the keys are spread over (each its own partition)
	creds  aws.Credentials
	signer *v4.Signer
	client *http.Client
}

var emptySHA = func() string { h := sha256.Sum256(nil); return hex.EncodeToString(h[:]) }()

func (g *granary) do(ctx context.Context, method, key string, body []byte, hdr map[string]string) (*http.Response, []byte, error) {
	ns := "bench"
	if g.spread > 1 {
		h := sha256.Sum256([]byte(key))
		ns = fmt.Sprintf("bench-%d", int(h[0])%g.spread)
	}
	req, err := http.NewRequestWithContext(ctx, method, g.base+"/kv/v1/"+ns+"/"+key, bytes.NewReader(body))
	if err != nil {
		return nil, nil, err
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	sum := emptySHA
	if len(body) > 0 {
		h := sha256.Sum256(body)
		sum = hex.EncodeToString(h[:])
	}
	if err := g.signer.SignHTTP(ctx, g.creds, req, sum, "kv", "us-east-1", time.Now()); err != nil {
		return nil, nil, err
	}
	resp, err := g.client.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, b, err
}

func (g *granary) write(ctx context.Context, key string, val []byte, hdr map[string]string) (int64, error) {
	hdr["content-type"] = "application/octet-stream"
	resp, b, err := g.do(ctx, http.MethodPut, key, val, hdr)
	if err != nil {
		return 0, err
	}
	if resp.StatusCode != 200 {
		return 0, fmt.Errorf("PUT %s: %d %s", key, resp.StatusCode, b)
	}
	var v struct {
		Version int64 `json:"version"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return 0, err
	}
	return v.Version, nil
}

func (g *granary) put(ctx context.Context, key string, val []byte) (int64, error) {
	return g.write(ctx, key, val, map[string]string{})
}

func (g *granary) cas(ctx context.Context, key string, val []byte, version int64) (int64, error) {
	return g.write(ctx, key, val, map[string]string{"if-match": strconv.FormatInt(version, 10)})
}

func (g *granary) get(ctx context.Context, key string) error {
	resp, b, err := g.do(ctx, http.MethodGet, key, nil, map[string]string{})
	if err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %d %s", key, resp.StatusCode, b)
	}
	return nil
}

type etcd struct{ c *clientv3.Client }

func (e *etcd) put(ctx context.Context, key string, val []byte) (int64, error) {
	r, err := e.c.Put(ctx, key, string(val))
	if err != nil {
		return 0, err
	}
	return r.Header.Revision, nil
}

func (e *etcd) get(ctx context.Context, key string) error {
	r, err := e.c.Get(ctx, key) // linearizable (the default)
	if err != nil {
		return err
	}
	if len(r.Kvs) != 1 {
		return fmt.Errorf("GET %s: not found", key)
	}
	return nil
}

func (e *etcd) cas(ctx context.Context, key string, val []byte, version int64) (int64, error) {
	r, err := e.c.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", version)).
		Then(clientv3.OpPut(key, string(val))).
		Commit()
	if err != nil {
		return 0, err
	}
	if !r.Succeeded {
		return 0, fmt.Errorf("CAS %s: revision moved", key)
	}
	return r.Header.Revision, nil
}

func main() {
	target := flag.String("target", "granary", "granary or etcd")
	endpoint := flag.String("endpoint", "", "Granary KV base URL, or etcd client URLs (comma-separated)")
	ak := flag.String("access-key", os.Getenv("AWS_ACCESS_KEY_ID"), "Granary access key id")
	sk := flag.String("secret-key", os.Getenv("AWS_SECRET_ACCESS_KEY"), "Granary secret key")
	op := flag.String("op", "put", "put, get or cas")
	conc := flag.Int("concurrency", 16, "concurrent clients")
	secs := flag.Float64("seconds", 15, "measured seconds")
	keys := flag.Int("keys", 10000, "key space (put, get)")
	size := flag.Int("value-size", 256, "value bytes")
	label := flag.String("label", "", "label in the output")
	spread := flag.Int("namespaces", 1, "Granary: spread the keys over this many namespaces (partitions); 1 = one namespace, like etcd's one keyspace")
	flag.Parse()

	var s store
	switch *target {
	case "granary":
		tr := &http.Transport{MaxIdleConnsPerHost: *conc * 2, MaxConnsPerHost: *conc * 2}
		s = &granary{base: strings.TrimRight(*endpoint, "/"), spread: *spread,
			creds:  aws.Credentials{AccessKeyID: *ak, SecretAccessKey: *sk},
			signer: v4.NewSigner(), client: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
	case "etcd":
		c, err := clientv3.New(clientv3.Config{Endpoints: strings.Split(*endpoint, ","), DialTimeout: 10 * time.Second})
		if err != nil {
			fmt.Fprintln(os.Stderr, "etcd:", err)
			os.Exit(1)
		}
		defer c.Close()
		s = &etcd{c: c}
	default:
		fmt.Fprintln(os.Stderr, "-target must be granary or etcd")
		os.Exit(2)
	}
	val := make([]byte, *size)
	_, _ = rand.Read(val)
	ctx := context.Background()
	key := func(i int) string { return fmt.Sprintf("k%08d", i) }

	// get reads keys that exist: write them first (not measured).
	if *op == "get" {
		var wg sync.WaitGroup
		per := (*keys + *conc - 1) / *conc
		for w := 0; w < *conc; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				for i := w * per; i < (w+1)*per && i < *keys; i++ {
					if _, err := s.put(ctx, key(i), val); err != nil {
						fmt.Fprintln(os.Stderr, "preload:", err)
						os.Exit(1)
					}
				}
			}(w)
		}
		wg.Wait()
	}

	deadline := time.Now().Add(time.Duration(*secs * float64(time.Second)))
	lat := make([][]time.Duration, *conc)
	errs := make([]int, *conc)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < *conc; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			// cas: each client owns one key and compare-and-sets it from the version
			// its last write returned (every CAS succeeds unless something is wrong).
			own := fmt.Sprintf("cas-%s-%d", *label, w)
			var version int64
			if *op == "cas" {
				v, err := s.put(ctx, own, val)
				if err != nil {
					fmt.Fprintln(os.Stderr, "cas setup:", err)
					os.Exit(1)
				}
				version = v
			}
			for time.Now().Before(deadline) {
				t := time.Now()
				var err error
				switch *op {
				case "put":
					_, err = s.put(ctx, key(mrand.IntN(*keys)), val)
				case "get":
					err = s.get(ctx, key(mrand.IntN(*keys)))
				case "cas":
					var v int64
					v, err = s.cas(ctx, own, val, version)
					if err == nil {
						version = v
					}
				}
				if err != nil {
					errs[w]++
					if errs[w] == 1 {
						fmt.Fprintln(os.Stderr, err)
					}
					continue
				}
				lat[w] = append(lat[w], time.Since(t))
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []time.Duration
	nerr := 0
	for w := range lat {
		all = append(all, lat[w]...)
		nerr += errs[w]
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return -1 // nothing succeeded (JSON has no NaN); see "errors"
		}
		return float64(all[int(math.Min(float64(len(all)-1), p*float64(len(all))))].Microseconds()) / 1000
	}
	out, _ := json.Marshal(map[string]any{
		"target": *target, "label": *label, "op": *op, "value_size": *size, "namespaces": *spread,
		"ops_per_s": float64(len(all)) / elapsed, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "errors": nerr,
	})
	fmt.Println(string(out))
}
