// Verifies a certificate chain with Go's crypto/x509, as Go services (Kubernetes,
// Envoy control planes, Vault, step, cfssl) would: parse, build the chain to the given
// roots through the given intermediates, and check the extended key usage.
//
//	verify ROOTS.pem INTERMEDIATES.pem LEAF.pem USAGE [DNSNAME]
//
// USAGE is server, client, documentsigning (id-kp-documentSigning, RFC 9336), ca
// (the leaf is itself a CA: verified as a chain with any usage) or parse (parse only).
// Prints OK, or the error, and exits 0 or 1.
package main

import (
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"os"
)

func load(path string) []*x509.Certificate {
	data, err := os.ReadFile(path)
	if err != nil {
		fail(err)
	}
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return out
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			fail(err)
		}
		out = append(out, cert)
	}
}

func fail(err error) {
	fmt.Println(err)
	os.Exit(1)
}

var documentSigning = asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 3, 36}

func main() {
	roots, intermediates := x509.NewCertPool(), x509.NewCertPool()
	for _, c := range load(os.Args[1]) {
		roots.AddCert(c)
	}
	for _, c := range load(os.Args[2]) {
		intermediates.AddCert(c)
	}
	leaf := load(os.Args[3])[0]
	opts := x509.VerifyOptions{Roots: roots, Intermediates: intermediates}
	switch os.Args[4] {
	case "parse":
		fmt.Println("OK")
		return
	case "server":
		opts.KeyUsages = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	case "client":
		opts.KeyUsages = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	case "ca":
		opts.KeyUsages = []x509.ExtKeyUsage{x509.ExtKeyUsageAny}
	case "documentsigning":
		found := false
		for _, oid := range leaf.UnknownExtKeyUsage {
			found = found || oid.Equal(documentSigning)
		}
		if !found {
			fail(fmt.Errorf("no id-kp-documentSigning EKU"))
		}
		opts.KeyUsages = []x509.ExtKeyUsage{x509.ExtKeyUsageAny}
	default:
		fail(fmt.Errorf("unknown usage %q", os.Args[4]))
	}
	if len(os.Args) > 5 {
		opts.DNSName = os.Args[5]
	}
	if _, err := leaf.Verify(opts); err != nil {
		fail(err)
	}
	fmt.Println("OK")
}
