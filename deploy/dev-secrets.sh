#!/bin/sh
# Creates the development secrets the compose stack mounts, in deploy/secrets/ (or DIR):
#   hs256.key         the HS256 secret gRPC bearer tokens are signed with (64 characters)
#   master-keys.json  the master key that encrypts stored datasource secrets (version 1)
# Both mode 0600. An existing file is kept, so tokens already minted stay valid; delete a file
# to replace it. Needs openssl.
#
# usage: deploy/dev-secrets.sh [DIR]
set -eu

dir=${1:-$(dirname "$0")/secrets}
umask 077
mkdir -p "$dir"

if [ -e "$dir/hs256.key" ]; then
    echo "kept $dir/hs256.key"
else
    openssl rand -base64 48 >"$dir/hs256.key"
    echo "created $dir/hs256.key"
fi

if [ -e "$dir/master-keys.json" ]; then
    echo "kept $dir/master-keys.json"
else
    printf '{"active": 1, "keys": {"1": "%s"}}\n' "$(openssl rand -base64 32)" >"$dir/master-keys.json"
    echo "created $dir/master-keys.json"
fi
