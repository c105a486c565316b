// Command lincheck checks a history of register operations for linearizability with
// Porcupine (github.com/anishathalye/porcupine). The Granary nemesis test
// (tests/e2e/tests/linearizability.rs) writes the history, one JSON object per line:
//
//	{"client":3,"key":"kv/ns0/k1","op":"cas","value":"c3-17","expect":"c1-9",
//	 "result":"ok","call":1200,"ret":3400}
//
// op is one of
//
//	get     a read; "found" and "read" hold what it saw
//	put     an unconditional write of "value"
//	cas     write "value" only if the register holds "expect"
//	create  write "value" only if the register is empty
//	delete  empty the register; "fail" means it was already empty
//	clear   empty the register unconditionally (S3 DeleteObject)
//
// and result is "ok", "fail" (a definite refusal: the condition did not hold) or
// "unknown" (a timeout or an answer that leaves the outcome open: the operation may
// have taken effect at any point after its call, or never). Times are nanoseconds.
//
// Each key is a register, checked on its own. Exit status: 0 linearizable, 1 not (the
// offending key's history is printed, and drawn to --html), 2 the check timed out or
// the input is malformed.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/anishathalye/porcupine"
)

type record struct {
	Client int     `json:"client"`
	Key    string  `json:"key"`
	Op     string  `json:"op"`
	Value  string  `json:"value"`
	Expect string  `json:"expect"`
	Result string  `json:"result"`
	Found  bool    `json:"found"`
	Read   *string `json:"read"`
	Call   int64   `json:"call"`
	Ret    int64   `json:"ret"`
}

type input struct {
	op, value, expect string
}

type output struct {
	result string // ok, fail, unknown
	found  bool
	read   string
}

// The register's state: "" is empty (values are never empty).
func step(state, in, out interface{}) (bool, interface{}) {
	s := state.(string)
	i := in.(input)
	o := out.(output)
	switch i.op {
	case "get":
		if !o.found {
			return s == "", s
		}
		return s == o.read, s
	case "put":
		return o.result != "fail", i.value
	case "clear":
		return o.result != "fail", ""
	case "cas", "create":
		holds := s == i.expect // create: expect is "", the empty register
		switch o.result {
		case "ok":
			return holds, i.value
		case "fail":
			return !holds, s
		default: // it took effect iff it was linearized where the condition held
			if holds {
				return true, i.value
			}
			return true, s
		}
	case "delete":
		switch o.result {
		case "ok":
			return s != "", ""
		case "fail":
			return s == "", s
		default:
			return true, ""
		}
	}
	return false, s
}

func describe(in, out interface{}) string {
	i := in.(input)
	o := out.(output)
	switch i.op {
	case "get":
		if !o.found {
			return "get() -> empty"
		}
		return fmt.Sprintf("get() -> %s", o.read)
	case "put":
		return fmt.Sprintf("put(%s) %s", i.value, o.result)
	case "clear":
		return fmt.Sprintf("clear() %s", o.result)
	case "cas":
		return fmt.Sprintf("cas(%s -> %s) %s", i.expect, i.value, o.result)
	case "create":
		return fmt.Sprintf("create(%s) %s", i.value, o.result)
	case "delete":
		return fmt.Sprintf("delete() %s", o.result)
	}
	return i.op
}

var model = porcupine.Model{
	Init:              func() interface{} { return "" },
	Step:              step,
	Equal:             func(a, b interface{}) bool { return a.(string) == b.(string) },
	DescribeOperation: describe,
	DescribeState: func(s interface{}) string {
		if s.(string) == "" {
			return "empty"
		}
		return s.(string)
	},
}

func fail(code int, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "lincheck: "+format+"\n", args...)
	os.Exit(code)
}

func main() {
	timeout := flag.Duration("timeout", 5*time.Minute, "give up on one key's check after this long")
	html := flag.String("html", "", "write Porcupine's visualization of an illegal key here")
	flag.Parse()
	if flag.NArg() != 1 {
		fail(2, "usage: lincheck [--timeout D] [--html FILE] HISTORY.jsonl")
	}
	f, err := os.Open(flag.Arg(0))
	if err != nil {
		fail(2, "%v", err)
	}
	byKey := map[string][]porcupine.Operation{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	line := 0
	for sc.Scan() {
		line++
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		var r record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			fail(2, "line %d: %v", line, err)
		}
		switch r.Op {
		case "get", "put", "cas", "create", "delete", "clear":
		default:
			fail(2, "line %d: unknown op %q", line, r.Op)
		}
		switch r.Result {
		case "ok", "fail", "unknown":
		default:
			fail(2, "line %d: unknown result %q", line, r.Result)
		}
		if r.Op == "get" && r.Result != "ok" {
			fail(2, "line %d: a read that did not complete has no place in a history", line)
		}
		ret := r.Ret
		if r.Result == "unknown" {
			ret = math.MaxInt64 // may take effect at any time after its call, or never
		}
		o := output{result: r.Result, found: r.Found}
		if r.Read != nil {
			o.read = *r.Read
		}
		byKey[r.Key] = append(byKey[r.Key], porcupine.Operation{
			ClientId: r.Client,
			Input:    input{op: r.Op, value: r.Value, expect: r.Expect},
			Call:     r.Call,
			Output:   o,
			Return:   ret,
		})
	}
	if err := sc.Err(); err != nil {
		fail(2, "%v", err)
	}
	keys := make([]string, 0, len(byKey))
	for k := range byKey {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	status := 0
	for _, k := range keys {
		ops := byKey[k]
		started := time.Now()
		res, info := porcupine.CheckOperationsVerbose(model, ops, *timeout)
		fmt.Printf("%-24s %5d operations: %s (%.1f s)\n", k, len(ops), res, time.Since(started).Seconds())
		switch res {
		case porcupine.Illegal:
			status = 1
			explain(k, ops, info)
			if *html != "" {
				if err := porcupine.VisualizePath(model, info, *html); err != nil {
					fmt.Fprintf(os.Stderr, "lincheck: visualization: %v\n", err)
				} else {
					fmt.Printf("visualization of %s: %s\n", k, *html)
				}
				*html = ""
			}
		case porcupine.Unknown:
			if status == 0 {
				status = 2
			}
		}
	}
	os.Exit(status)
}

func show(op porcupine.Operation) string {
	ret := "never"
	if op.Return != math.MaxInt64 {
		ret = fmt.Sprintf("%.3f s", float64(op.Return)/1e9)
	}
	return fmt.Sprintf("client %-3d %8.3f s .. %-9s %s", op.ClientId, float64(op.Call)/1e9, ret, describe(op.Input, op.Output))
}

// explain prints the end of the longest linearizable prefix of the key's history and
// the operations that could not be placed after it: the smallest part of the history
// that shows the violation.
func explain(key string, ops []porcupine.Operation, info porcupine.LinearizationInfo) {
	fmt.Printf("\n%s is not linearizable.\n", key)
	partials := info.PartialLinearizationsOperations()
	var longest []porcupine.Operation
	for _, p := range partials {
		for _, l := range p {
			if len(l) > len(longest) {
				longest = l
			}
		}
	}
	state := model.Init()
	placed := map[string]bool{}
	idOf := func(op porcupine.Operation) string { return fmt.Sprintf("%d/%d/%v", op.ClientId, op.Call, op.Input) }
	fmt.Printf("longest linearizable prefix: %d of %d operations; its last steps:\n", len(longest), len(ops))
	for n, op := range longest {
		_, state = model.Step(state, op.Input, op.Output)
		placed[idOf(op)] = true
		if n >= len(longest)-8 {
			fmt.Printf("  %s  => %s\n", show(op), model.DescribeState(state))
		}
	}
	// No remaining operation can come next: each is shown with why (its result
	// contradicts the state, or another one had to come first).
	var rest []porcupine.Operation
	for _, op := range ops {
		if !placed[idOf(op)] {
			rest = append(rest, op)
		}
	}
	sort.Slice(rest, func(a, b int) bool { return rest[a].Call < rest[b].Call })
	firstReturn := int64(math.MaxInt64)
	for _, op := range rest {
		if op.Return < firstReturn {
			firstReturn = op.Return
		}
	}
	fmt.Printf("none of these can come next (state %s):\n", model.DescribeState(state))
	for _, op := range rest {
		if op.Call > firstReturn {
			break
		}
		fmt.Printf("  %s\n", show(op))
	}
}
