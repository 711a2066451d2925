#!/bin/sh
# Regenerates the test CA and server certificate used by the WebSocket/TLS tests.
# Run from tests/data/. Validity: 100 years. Keys: ECDSA P-256 (PKCS#8).
set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout ca.key -out ca.pem -days 36500 -subj "/CN=Luna Test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout server.key -out server.csr -subj "/CN=localhost"
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -out server.pem -days 36500 -extfile server.ext
# An unrelated key, for the "key does not match certificate" test.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out other.key
rm -f server.csr server.ext ca.srl
