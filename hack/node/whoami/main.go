// whoami: asks the API server who the Pod's projected ServiceAccount token is, the way an
// in-cluster client does it: the `kubernetes` Service from KUBERNETES_SERVICE_HOST/PORT, the
// token and the CA bundle from the mounted ServiceAccount volume, the certificate verified
// (busybox's wget cannot do TLS with the API server). Prints the SelfSubjectReview's status.
//
//	kube-whoami patch PATH JSON   sends JSON as a merge PATCH to PATH with the same token and
//	                              prints the answer, "patch: <code> <body>": what a Pod that
//	                              steals or borrows a token can do with it (tests/node.rs
//	                              forges a cache's status this way and expects a refusal).
//
// Part of the consumer image (hack/image.sh); static, standard library only.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
)

const sa = "/var/run/secrets/kubernetes.io/serviceaccount/"

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "whoami:", err)
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) == 4 && os.Args[1] == "patch" {
		code, out, err := send("PATCH", os.Args[2], "application/merge-patch+json", []byte(os.Args[3]))
		if err != nil {
			return err
		}
		// The answer is the result, refusals included: the caller reads it from the log.
		fmt.Printf("patch: %d %s\n", code, out)
		return nil
	}
	if len(os.Args) != 1 {
		return fmt.Errorf("usage: kube-whoami [patch PATH JSON]")
	}
	body := []byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`)
	code, out, err := send("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", "application/json", body)
	if err != nil {
		return err
	}
	if code != http.StatusCreated {
		return fmt.Errorf("%d: %s", code, out)
	}
	fmt.Println(string(out))
	return nil
}

// send makes one request to the API server as the Pod's ServiceAccount: its status code and body.
func send(method, path, contentType string, body []byte) (int, []byte, error) {
	token, err := os.ReadFile(sa + "token")
	if err != nil {
		return 0, nil, err
	}
	ca, err := os.ReadFile(sa + "ca.crt")
	if err != nil {
		return 0, nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return 0, nil, fmt.Errorf("no certificate in %sca.crt", sa)
	}
	host := net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"))
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	req, err := http.NewRequest(method, "https://"+host+path, bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Authorization", "Bearer "+string(bytes.TrimSpace(token)))
	req.Header.Set("Content-Type", contentType)
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	return resp.StatusCode, out, err
}
