# Start and stop a throwaway single-node Garage on loopback (sourced by the bench scripts).
# Sets GARAGE_ENDPOINT, AWS_* and GARAGE_CFG; garage_stop kills it and removes its data.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

garage_start() {
  local dir=$1
  mkdir -p "$dir"
  local rpc s3 admin
  rpc=$(free_port); s3=$(free_port); admin=$(free_port)
  GARAGE_CFG=$dir/garage.toml
  cat > "$GARAGE_CFG" <<CFG
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
admin_token = "bench"
CFG
  chmod 600 "$GARAGE_CFG"
  garage -c "$GARAGE_CFG" server > "$dir/garage.log" 2>&1 &
  GARAGE_PID=$!
  for _ in $(seq 1 100); do garage -c "$GARAGE_CFG" status >/dev/null 2>&1 && break; sleep 0.2; done
  local node
  node=$(garage -c "$GARAGE_CFG" node id -q | cut -d@ -f1)
  garage -c "$GARAGE_CFG" layout assign -z dc1 -c 100G "$node" >/dev/null
  garage -c "$GARAGE_CFG" layout apply --version 1 >/dev/null
  garage -c "$GARAGE_CFG" bucket create bench >/dev/null
  local key
  key=$(garage -c "$GARAGE_CFG" key create bench-key)
  export AWS_ACCESS_KEY_ID=$(echo "$key" | awk -F': *' '/Key ID/ {print $2}')
  export AWS_SECRET_ACCESS_KEY=$(echo "$key" | awk -F': *' '/Secret key/ {print $2}')
  garage -c "$GARAGE_CFG" bucket allow --read --write --owner bench --key bench-key >/dev/null
  export AWS_REGION=garage
  export AWS_ENDPOINT_URL=http://127.0.0.1:$s3
  GARAGE_ADMIN=$admin
}

garage_get_count() {
  curl -s "http://127.0.0.1:$GARAGE_ADMIN/metrics" |
    awk '/^api_s3_request_counter/ && /api_endpoint="GetObject"/ {s += $NF} END {print s+0}'
}

garage_stop() {
  [ -n "${GARAGE_PID:-}" ] && kill "$GARAGE_PID" 2>/dev/null && wait "$GARAGE_PID" 2>/dev/null
  GARAGE_PID=
}

# Quick ACKs on loopback (GARAGE.md: Garage's small responses otherwise wait ~40 ms for a
# delayed ACK). Saved and restored by the caller through quickack_off.
quickack_on() {
  QUICKACK_SAVED=$(ip route show table local)
  ip route change table local local 127.0.0.0/8 dev lo proto kernel scope host src 127.0.0.1 quickack 1
  ip route change table local local 127.0.0.1 dev lo proto kernel scope host src 127.0.0.1 quickack 1
}
quickack_off() {
  ip route change table local local 127.0.0.0/8 dev lo proto kernel scope host src 127.0.0.1 2>/dev/null || true
  ip route change table local local 127.0.0.1 dev lo proto kernel scope host src 127.0.0.1 2>/dev/null || true
}
