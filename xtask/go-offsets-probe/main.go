// Command go-offsets-probe is never run; it is built by `cargo xtask go-offsets` with every
// supported Go release and gin version, and by the tracer's unit tests, so that the linker
// writes DWARF for the structs whose field offsets difytrace's Go uprobes read:
// net/http.Request, net/url.URL, net/http.persistConn (client side), net.conn, net.netFD,
// internal/poll.FD, net/http.response (server side) and gin's Context.
//
// The linker only describes types that live code uses, so every path below must stay
// reachable: it depends on the command line, which the compiler cannot know.
package main

import (
	"fmt"
	"net/http"
	"os"

	"github.com/gin-gonic/gin"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Println("usage: go-offsets-probe serve ADDR | get URL")
		return
	}
	switch os.Args[1] {
	case "serve":
		engine := gin.New()
		engine.GET("/items/:id", func(c *gin.Context) {
			c.String(http.StatusOK, "route %s path %s", c.FullPath(), c.Request.URL.Path)
		})
		// http.Server's conn serves engine through net/http.response.
		if err := http.ListenAndServe(os.Args[2], engine); err != nil {
			fmt.Println(err)
		}
	case "get":
		// http.Client's Transport dials through net/http.persistConn.
		client := &http.Client{}
		resp, err := client.Get(os.Args[2])
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Println(resp.Request.Method, resp.Status)
		resp.Body.Close()
	}
}
