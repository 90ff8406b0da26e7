#!/bin/sh
# Prints a bearer token for the compose stack's registry: an HS256 JWT signed with
# deploy/secrets/hs256.key (or SECRET_FILE), with the issuer and audience docker-compose.yml
# gives dsreg. Use it as DSREG_TOKEN for `dsreg` commands, or in an `authorization: Bearer`
# header. Needs openssl.
#
# usage: deploy/dev-token.sh [SECRET_FILE]
# Claims come from the environment, with these defaults:
#   TOKEN_SUB=dev  TOKEN_ROLE=datasource:admin (or datasource:operator, datasource:viewer)
#   TOKEN_ORG='*' (every org)  TOKEN_TTL_SECS=28800 (8 hours)
#   DSREG_AUTH_ISSUER=dsreg-compose  DSREG_AUTH_AUDIENCE=dsreg
#
# The secret is handed to openssl as an argument, so it shows in this machine's process list
# while openssl runs: fine for a development secret, not for a production one.
set -eu

secret_file=${1:-$(dirname "$0")/secrets/hs256.key}
if [ ! -s "$secret_file" ]; then
    echo "$secret_file is missing: run deploy/dev-secrets.sh first" >&2
    exit 1
fi

b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }

now=$(date +%s)
header=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
payload=$(printf '{"sub":"%s","roles":["%s"],"org":"%s","iss":"%s","aud":"%s","iat":%d,"exp":%d}' \
    "${TOKEN_SUB:-dev}" "${TOKEN_ROLE:-datasource:admin}" "${TOKEN_ORG:-*}" \
    "${DSREG_AUTH_ISSUER:-dsreg-compose}" "${DSREG_AUTH_AUDIENCE:-dsreg}" \
    "$now" "$((now + ${TOKEN_TTL_SECS:-28800}))" | b64url)
# The registry uses the file's bytes less one trailing newline; $(cat) drops it the same way
# (the secret is base64 text, so it has no other trailing newline).
signature=$(printf '%s.%s' "$header" "$payload" |
    openssl dgst -sha256 -mac HMAC -macopt "key:$(cat "$secret_file")" -binary | b64url)
printf '%s.%s.%s\n' "$header" "$payload" "$signature"
