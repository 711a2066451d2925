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
# The same names, signed by the CA, expired in 2021 (for the "expired certificate" tests).
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -keyout expired.key -out expired.csr -subj "/CN=localhost"
mkdir -p ca.db && : > ca.db/index.txt && echo 1000 > ca.db/serial
printf '[ca]\ndefault_ca=t\n[t]\ndatabase=ca.db/index.txt\nserial=ca.db/serial\nnew_certs_dir=ca.db\ndefault_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n[ext]\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' > ca.cnf
openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca.key -in expired.csr -out expired.pem \
  -startdate 20200101000000Z -enddate 20210101000000Z -extensions ext -notext
rm -rf ca.db ca.cnf expired.csr
# An unrelated key, for the "key does not match certificate" test.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out other.key
rm -f server.csr server.ext ca.srl
