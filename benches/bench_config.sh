# Sourced by benches/cpu_per_request.sh and benches/paced_cpu.sh: a free port, and the
# rollgate config both measure, in front of the harness's nginx upstream (../shared/bench/peers/conf/
# upstream-nginx.conf: versions a and b on 18001 and 18002), a 95/5 split, evaluator on.
# bench_config DATA_PORT ADMIN_PORT STATE_DIR > FILE
bench_config() {
  cat <<YAML
listen: 127.0.0.1:$1
admin: {listen: 127.0.0.1:$2}
state_dir: $3
versions:
  a: {endpoints: [http://127.0.0.1:18001]}
  b: {endpoints: [http://127.0.0.1:18002]}
routes:
  - {name: bench, match: {path_prefix: /}, baseline: a, split: {a: 95, b: 5}}
YAML
}

# port: a free TCP port on 127.0.0.1.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
