#!/usr/bin/env bash
# Provisions the two-site pilot of docker/compose.two-site.yml into DIR:
#
#   DIR/devices/        the simulated QKD device pair (device CA, server certificates, KME clients)
#   DIR/kme-a/          site A's KME working directory (config, PKI, KEK, peers/, device/): /site in kme-a
#   DIR/kme-b/          site B's
#   DIR/bundles/        the two KMEs' public peer bundles
#   DIR/sae/            the SAEs' credentials (SAE-A1, SAE-A2 at site A; SAE-B1, SAE-B2 at B) and both CAs
#   DIR/offline/        the sites' CA private keys, moved out of the directories the KMEs mount
#
# Steps: `qkms sim device init`; `qkms init` per site (its own CA, KEK and database); server
# certificates re-issued for the names the containers are reached by (kme-a, kme-b, qkd-devices);
# `qkms peer export` / `qkms peer add --url` both ways; `qkms peer link` at both ends of link-ab, an
# ETSI GS QKD 014 link through the device pair (A master, B follower).
#
# `qkms init` and `qkms peer export` write to each site's database (schema, SAE registry, the KME's
# ML-DSA/ML-KEM identity, which the peer bundle publishes), so they must run against the database the
# KME will use. In the compose pilot this script runs in the `provision` service, on both sites'
# networks:
#
#   docker-compose -f docker/compose.two-site.yml run --rm provision
#
# Outside compose it runs anywhere `qkms` is installed; without database URLs each site gets a SQLite
# file in its directory (a dry run: the tests use it).
#
# Environment:
#   QKMS                 the qkms command (default: qkms), e.g. "python -m kms"
#   QKMS_DB_URL_A/_B     each site's SQLAlchemy URL, without a password (default: SQLite in the site dir)
#   QKMS_PG_PASSWORD_A/_B  that database's password, given to libpq as PGPASSWORD for that site only
#   KME_A_HOST, KME_B_HOST, DEVICE_HOST, KME_A_PORT, KME_B_PORT, DEVICE_PORT_A, DEVICE_PORT_B
#                        the names and ports the containers reach each other by (defaults: the
#                        compose service names, 8443 for both KMEs, 9401 and 9402 for the devices)
set -euo pipefail

out=${1:?usage: provision-two-site.sh DIR}
read -r -a qkms <<<"${QKMS:-qkms}"
kme_a_host=${KME_A_HOST:-kme-a}
kme_b_host=${KME_B_HOST:-kme-b}
device_host=${DEVICE_HOST:-qkd-devices}
kme_a_port=${KME_A_PORT:-8443}
kme_b_port=${KME_B_PORT:-8443}
device_port_a=${DEVICE_PORT_A:-9401}
device_port_b=${DEVICE_PORT_B:-9402}

for d in devices kme-a kme-b bundles sae offline; do
  if [ -e "$out/$d" ]; then
    echo "error: $out/$d exists: the pilot is already provisioned (remove $out and the databases to redo it)" >&2
    exit 2
  fi
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
umask 077

# qkms for one site: that site's database password only.
site() {
  local s=$1
  shift
  local pw_var="QKMS_PG_PASSWORD_$s"
  if [ -n "${!pw_var:-}" ]; then
    PGPASSWORD="${!pw_var}" "${qkms[@]}" "$@"
  else
    "${qkms[@]}" "$@"
  fi
}

echo "== simulated QKD device pair"
"${qkms[@]}" sim device init --dir "$out/devices" --site-a-client kme-a --site-b-client kme-b
for dev in a b; do
  "${qkms[@]}" pilot server-cert --ca-cert "$out/devices/ca.pem" --ca-key "$out/devices/ca.key" \
    --cert "$out/devices/device-$dev.pem" --key "$out/devices/device-$dev.key" \
    --hostname "$device_host" --hostname localhost
done

declare -A kme_id=([A]=KME-A [B]=KME-B)
declare -A host=([A]="$kme_a_host" [B]="$kme_b_host")
declare -A port=([A]="$kme_a_port" [B]="$kme_b_port")
declare -A saes=([A]="SAE-A1 SAE-A2" [B]="SAE-B1 SAE-B2")
mkdir -p "$out/bundles" "$out/sae" "$out/offline"
for s in A B; do
  dir="$out/kme-${s,,}"
  echo "== site $s: ${kme_id[$s]} in $dir"
  args=(init --dir "$dir" --kme-id "${kme_id[$s]}" --port "${port[$s]}" --link-source none)
  for sae in ${saes[$s]}; do args+=(--sae "$sae"); done
  url_var="QKMS_DB_URL_$s"
  if [ -n "${!url_var:-}" ]; then args+=(--database-url "${!url_var}"); fi
  site "$s" "${args[@]}"
  "${qkms[@]}" pilot server-cert --ca-cert "$dir/pki/ca.pem" --ca-key "$dir/pki/ca.key" \
    --cert "$dir/pki/kme.pem" --key "$dir/pki/kme.key" --hostname "${host[$s]}" --hostname localhost
  site "$s" peer export --config "$dir/qkms.toml" --out "$out/bundles/${kme_id[$s]}.json"
  # The KME's device credentials, inside the directory its container mounts.
  mkdir -p "$dir/device"
  install -m 0644 "$out/devices/ca.pem" "$dir/device/ca.pem"
  install -m 0644 "$out/devices/clients/kme-${s,,}.pem" "$dir/device/kme-${s,,}.pem"
  install -m 0600 "$out/devices/clients/kme-${s,,}.key" "$dir/device/kme-${s,,}.key"
done

echo "== peering"
site A peer add --config "$out/kme-a/qkms.toml" --bundle "$out/bundles/KME-B.json" \
  --url "https://$kme_b_host:$kme_b_port"
site B peer add --config "$out/kme-b/qkms.toml" --bundle "$out/bundles/KME-A.json" \
  --url "https://$kme_a_host:$kme_a_port"
common='"protocol": "decoy-bb84", "distance_km": 25.0, "timeout_s": 5.0, "ca_cert": "device/ca.pem"'
site A peer link --config "$out/kme-a/qkms.toml" --link-id link-ab --peer KME-B --source etsi014 \
  --options "{\"role\": \"master\", \"url\": \"https://$device_host:$device_port_a\", \"peer_sae_id\": \"kme-b\",
    \"client_cert\": \"device/kme-a.pem\", \"client_key\": \"device/kme-a.key\", $common,
    \"keys_per_pull\": 64, \"key_size\": 256, \"poll_interval_s\": 1.0, \"max_backoff_s\": 10.0}"
site B peer link --config "$out/kme-b/qkms.toml" --link-id link-ab --peer KME-A --source etsi014 \
  --options "{\"role\": \"follower\", \"url\": \"https://$device_host:$device_port_b\", \"peer_sae_id\": \"kme-a\",
    \"client_cert\": \"device/kme-b.pem\", \"client_key\": \"device/kme-b.key\", $common}"

echo "== SAE credentials and offline CA keys"
# The SAEs' credentials belong to the SAE applications, not to their KME: move them out of the
# directories the KMEs mount (a KME knows its SAEs by certificate fingerprint, in qkms.toml).
install -m 0644 "$out/kme-a/pki/ca.pem" "$out/sae/KME-A-ca.pem"
install -m 0644 "$out/kme-b/pki/ca.pem" "$out/sae/KME-B-ca.pem"
for s in a b; do
  for sae in ${saes[${s^^}]}; do
    install -m 0644 "$out/kme-$s/pki/sae/$sae.pem" "$out/sae/$sae.pem"
    mv "$out/kme-$s/pki/sae/$sae.key" "$out/sae/$sae.key"
  done
done
# A running KME needs its CA certificate, never the CA key: keep the keys out of the mounted dirs.
mv "$out/kme-a/pki/ca.key" "$out/offline/KME-A-ca.key"
mv "$out/kme-b/pki/ca.key" "$out/offline/KME-B-ca.key"
mv "$out/devices/ca.key" "$out/offline/device-ca.key"

echo "provisioned the two-site pilot in $out"
