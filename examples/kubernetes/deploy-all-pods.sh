#!/usr/bin/env bash
# Ship an in-place fix to every pod of a label selector, one pod after the other, with
# `hotpatch deploy` inside each pod (docs/kubernetes.md, "Shipping a fix in place").
#
#   ./deploy-all-pods.sh -l app.kubernetes.io/name=hotpatch-example --from ./app app.py
#
# For each running pod, in order: copy each FILE (a path relative to --from) into the pod's app
# directory (the previous file is kept as FILE.hotpatch.bak, which a release snapshot leaves out),
# then run `hotpatch deploy` against the pod's gunicorn master. The first pod that does not
# answer "deployed" stops the loop; that pod gets its previous files back unless its outcome is
# unknown. Pods already done keep the fix: the fleet is then mixed, and the script says which.
#
# Exit codes: 0 every pod deployed; 1 a pod refused or rolled back (it runs its previous code);
# 2 usage or environment error (bad arguments, no pod, kubectl or a copy failed, hotpatch could
# not start); 3 outcome unknown in a pod (still running, or the connection broke): run
# `kubectl exec POD -- hotpatch status --pidfile PIDFILE`.
#
# A pod started again from the image (a new pod, a rescheduled or evicted one) runs the image's
# code WITHOUT this fix: build the same change into the next image; that is the durable path.
set -euo pipefail

selector=""
namespace=""
container="app"
from_dir="."
app_dir="/srv/app"
pidfile="/tmp/gunicorn.pid"
strategy="in-place"
timeout_s="60"
files=()

usage() {
    cat >&2 <<'USAGE'
usage: deploy-all-pods.sh -l SELECTOR [-n NAMESPACE] [-c CONTAINER] [--from DIR]
                          [--app-dir DIR] [--pidfile PATH] [--strategy in-place|auto|rolling]
                          [--timeout SECONDS] FILE...
USAGE
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        -l|--selector) selector="${2:?}"; shift 2 ;;
        -n|--namespace) namespace="${2:?}"; shift 2 ;;
        -c|--container) container="${2:?}"; shift 2 ;;
        --from) from_dir="${2:?}"; shift 2 ;;
        --app-dir) app_dir="${2:?}"; shift 2 ;;
        --pidfile) pidfile="${2:?}"; shift 2 ;;
        --strategy) strategy="${2:?}"; shift 2 ;;
        --timeout) timeout_s="${2:?}"; shift 2 ;;
        -h|--help) usage ;;
        --) shift; files+=("$@"); break ;;
        -*) echo "deploy-all-pods: unknown option $1" >&2; usage ;;
        *) files+=("$1"); shift ;;
    esac
done

[ -n "$selector" ] || { echo "deploy-all-pods: -l SELECTOR is required" >&2; usage; }
[ "${#files[@]}" -gt 0 ] || { echo "deploy-all-pods: name at least one FILE" >&2; usage; }
case "$strategy" in in-place|auto|rolling) ;; *) echo "deploy-all-pods: bad --strategy $strategy" >&2; usage ;; esac
case "$timeout_s" in ''|*[!0-9]*) echo "deploy-all-pods: --timeout must be whole seconds" >&2; usage ;; esac
for rel in "${files[@]}"; do
    case "/$rel/" in
        //*|*/../*|*/./*|/-*) echo "deploy-all-pods: $rel: must be a relative path inside the app directory" >&2; exit 2 ;;
    esac
    [ -f "$from_dir/$rel" ] || { echo "deploy-all-pods: $from_dir/$rel: not a regular file" >&2; exit 2; }
done
command -v kubectl >/dev/null || { echo "deploy-all-pods: kubectl not found" >&2; exit 2; }

kc=(kubectl)
[ -z "$namespace" ] || kc+=(--namespace "$namespace")

pods=()
while IFS= read -r pod; do
    [ -z "$pod" ] || pods+=("$pod")
done < <("${kc[@]}" get pods --selector "$selector" --field-selector status.phase=Running \
    --output 'jsonpath={range .items[*]}{.metadata.name}{"\n"}{end}') \
    || { echo "deploy-all-pods: kubectl get pods failed" >&2; exit 2; }
[ "${#pods[@]}" -gt 0 ] || { echo "deploy-all-pods: no running pod matches $selector" >&2; exit 2; }
echo "deploy-all-pods: ${#pods[@]} pods: ${pods[*]}"

# Runs in the pod: keep the previous file (or note that there was none), write the new one
# atomically (a .hotpatch.tmp file renamed over it). Prints "existed" or "new".
put_script='set -eu
f="$1"
if [ -e "$f" ]; then cp -p "$f" "$f.hotpatch.bak"; state=existed; else rm -f "$f.hotpatch.bak"; state=new; fi
cat > "$f.hotpatch.tmp"
mv "$f.hotpatch.tmp" "$f"
echo "$state"'
restore_script='set -eu
f="$1"
if [ "$2" = existed ]; then mv "$f.hotpatch.bak" "$f"; else rm -f "$f"; fi'

done_pods=()
finish() {  # finish CODE MESSAGE
    echo "deploy-all-pods: $2" >&2
    if [ "${#done_pods[@]}" -gt 0 ]; then
        echo "deploy-all-pods: these pods run the fix and keep it: ${done_pods[*]}" >&2
    fi
    echo "deploy-all-pods: in-place fixes are lost when a pod starts from the image: build this change into the next image" >&2
    exit "$1"
}

for pod in "${pods[@]}"; do
    states=()
    restore() {
        local i
        for i in "${!states[@]}"; do
            "${kc[@]}" exec -i "$pod" -c "$container" -- sh -c "$restore_script" sh \
                "$app_dir/${files[$i]}" "${states[$i]}" \
                || echo "deploy-all-pods: $pod: could not restore $app_dir/${files[$i]}" >&2
        done
    }
    for rel in "${files[@]}"; do
        if ! state=$("${kc[@]}" exec -i "$pod" -c "$container" -- sh -c "$put_script" sh \
                "$app_dir/$rel" < "$from_dir/$rel"); then
            restore
            finish 2 "$pod: copying $rel failed; the pod's files are restored, its code is unchanged"
        fi
        states+=("$state")
    done
    set +e
    out=$("${kc[@]}" exec "$pod" -c "$container" -- hotpatch deploy --pidfile "$pidfile" \
        --strategy "$strategy" --timeout "$timeout_s" --json)
    rc=$?
    set -e
    # The verdict is hotpatch's JSON line: its top-level "outcome" comes first, "exit_code" last.
    code=$(printf '%s\n' "$out" | grep -o '"exit_code": [0-9]*' | tail -n 1 | grep -o '[0-9]*$' || true)
    outcome=$(printf '%s\n' "$out" | grep -o '"outcome": "[a-z_]*"' | head -n 1 | cut -d '"' -f 4 || true)
    if [ -z "$code" ] && [ "$outcome" = error ]; then code=2; fi
    if [ -z "$code" ] && [ "$rc" -eq 2 ]; then code=2; fi  # hotpatch's own usage error, no JSON
    echo "deploy-all-pods: $pod: outcome ${outcome:-none} (hotpatch exit ${code:-none}, kubectl exit $rc)"
    case "${code:-unknown}" in
        0)
            for rel in "${files[@]}"; do
                "${kc[@]}" exec "$pod" -c "$container" -- rm -f "$app_dir/$rel.hotpatch.bak" || true
            done
            done_pods+=("$pod") ;;
        1)
            restore
            finish 1 "$pod: refused or rolled back: it runs its previous code, its files are restored; pods after it were not touched" ;;
        2)
            restore
            finish 2 "$pod: hotpatch could not deploy (usage or environment error); its files are restored" ;;
        *)
            finish 3 "$pod: outcome unknown (no verdict from hotpatch); files left as shipped; check: ${kc[*]} exec $pod -c $container -- hotpatch status --pidfile $pidfile" ;;
    esac
done
echo "deploy-all-pods: every pod deployed: ${done_pods[*]}"
echo "deploy-all-pods: in-place fixes are lost when a pod starts from the image: build this change into the next image" >&2
exit 0
