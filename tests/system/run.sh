#!/usr/bin/env bash
# System test of the aichat-backend RPM (`make system-test`; issue 5).
#
# Builds the RPM and SRPM (1.0.0, and 1.0.1 for the upgrade), lints and inspects them, scores the unit
# with systemd-analyze, then boots a real systemd in a container (debootstrap + systemd-nspawn, root file
# system cached under $CACHE keyed by suite, mirror and package list; a volatile overlay keeps the cache
# pristine), installs the package there and operates it as an administrator would: start, /health, MCP
# tools, users of the processes, logrotate + reload under a numbered load, restart/stop without orphans,
# a broken config seen in the journal, upgrade keeping an edited config, erase leaving .rpmsave.
#
# Prints PASS/FAIL/SKIP per check and a final "N passed, N failed, N skipped" line; exits 1 on any
# failure. Details go to build/system-test/system-test.log. Needs root and a Debian host.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${AICHAT_SYSTEM_TEST_CACHE:-/var/cache/aichat-system-test}
WORK=$ROOT/build/system-test
LOG=$WORK/system-test.log
VERSION=1.0.0
NEXT_VERSION=1.0.1
RELEASE=1
NAME=aichat-backend
UNIT=$NAME.service
CONF=/etc/$NAME/config.yaml
PORT=3001
DBPATH=(--dbpath /var/lib/rpm)
# Packages of the container: systemd, the venv's python3.11, node for MCP servers, rpm to install.
PKGS=systemd,systemd-sysv,dbus,python3,logrotate,iproute2,curl,rpm,nodejs,procps
CACHE_FORMAT=1

PASSED=0
FAILED=0
SKIPPED=0
START=$(date +%s)
CPID=
NSPID=
BUILD2=

rm -rf "$WORK"
mkdir -p "$WORK" "$CACHE"
: >"$LOG"

pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$*"; printf '=== PASS %s\n' "$*" >>"$LOG"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL  %s\n' "$*"; printf '=== FAIL %s\n' "$*" >>"$LOG"; }
skip() { SKIPPED=$((SKIPPED + 1)); printf 'SKIP  %s\n' "$*"; printf '=== SKIP %s\n' "$*" >>"$LOG"; }
note() { printf '      %s\n' "$*"; printf '=== %s\n' "$*" >>"$LOG"; }
elapsed() { echo $(($(date +%s) - START)); }
# check NAME CMD...: PASS if CMD succeeds (its output goes to the log).
check() {
    local name=$1
    shift
    printf '\n--- %s: %s\n' "$name" "$*" >>"$LOG"
    if "$@" >>"$LOG" 2>&1; then pass "$name"; else fail "$name"; fi
}
# first GLOB...: the first existing path of the expanded pattern(s), if any.
first() { local f; for f in "$@"; do [ -e "$f" ] && { echo "$f"; return 0; }; done; return 0; }
phase() { printf '\n## %s (t=%ss)\n' "$*" "$(elapsed)"; printf '\n##### %s\n' "$*" >>"$LOG"; }

# Commands inside the container (all its namespaces: mounts, pids, network, cgroup).
cx() { timeout 120 nsenter -t "$CPID" -a "$@"; }
csh() { timeout 120 nsenter -t "$CPID" -a /bin/sh -c "$1"; }
http_code() { cx curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$PORT$1"; }
main_pid() { cx systemctl show -p MainPID --value "$UNIT"; }
# PIDs in the service's cgroup, one per line (empty when stopped).
service_pids() {
    local cg root
    cg=$(cx systemctl show -p ControlGroup --value "$UNIT")
    [ -n "$cg" ] || return 0
    # cgroup v2 (unified), or the hybrid layout of a v1 host.
    for root in /sys/fs/cgroup /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do
        cx test -e "$root$cg/cgroup.procs" && { cx cat "$root$cg/cgroup.procs"; return 0; }
    done
    return 0
}
rpmq() { cx rpm "${DBPATH[@]}" "$@"; }

cleanup() {
    if [ -n "$BUILD2" ]; then wait "$BUILD2" 2>/dev/null; fi
    if [ -n "$CPID" ] && kill -0 "$CPID" 2>/dev/null; then
        cx journalctl --no-pager -u "$UNIT" >"$WORK/journal.txt" 2>&1 || true
        timeout 20 nsenter -t "$CPID" -a systemctl poweroff >/dev/null 2>&1 || true
    fi
    if [ -n "$NSPID" ]; then
        for _ in $(seq 100); do kill -0 "$NSPID" 2>/dev/null || break; sleep 0.2; done
        kill "$NSPID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

if [ "$(id -u)" != 0 ]; then
    echo "system test: must run as root (debootstrap, systemd-nspawn)" >&2
    exit 2
fi
cd "$ROOT" || exit 2

# ---------------------------------------------------------------------------------------------------
phase "Tools"
missing=()
for pair in rpmbuild:rpm rpmlint:rpmlint debootstrap:debootstrap systemd-nspawn:systemd-container \
    rpm2cpio:rpm2cpio cpio:cpio nsenter:util-linux; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
python3 -c 'import packaging' 2>/dev/null || missing+=(python3-packaging)
if [ ${#missing[@]} -gt 0 ]; then
    note "installing ${missing[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >>"$LOG" 2>&1 \
        || { fail "install ${missing[*]}"; }
fi
# A Python with pip to download the wheels (any version; the wheels' target is fixed in rpm.mk).
RPM_PYTHON=python3
if ! python3 -m pip --version >/dev/null 2>&1; then
    if [ -x "$ROOT/.venv/bin/python" ]; then
        RPM_PYTHON=$ROOT/.venv/bin/python
    else
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip; } >>"$LOG" 2>&1
    fi
fi

# ---------------------------------------------------------------------------------------------------
phase "Build"
rm -rf build/rpm/RPMS build/rpm/SRPMS
check "make rpm builds $NAME $VERSION-$RELEASE (binary + source)" \
    make -f rpm.mk rpm VERSION=$VERSION RELEASE=$RELEASE RPM_PYTHON="$RPM_PYTHON"
RPM1=$(first build/rpm/RPMS/x86_64/$NAME-$VERSION-$RELEASE.*x86_64.rpm)
SRPM1=$(first build/rpm/SRPMS/$NAME-$VERSION-$RELEASE.*src.rpm)
check "RPM named $NAME-$VERSION-$RELEASE.<dist>.x86_64.rpm: ${RPM1##*/}" \
    grep -Eq "^$NAME-$VERSION-$RELEASE\.[a-z0-9_]+\.x86_64\.rpm\$" <<<"${RPM1##*/}"
check "SRPM named $NAME-$VERSION-$RELEASE.<dist>.src.rpm: ${SRPM1##*/}" \
    grep -Eq "^$NAME-$VERSION-$RELEASE\.[a-z0-9_]+\.src\.rpm\$" <<<"${SRPM1##*/}"
# The upgrade's package builds in the background while the first one is checked and installed.
make -f rpm.mk rpm VERSION=$NEXT_VERSION RELEASE=$RELEASE RPM_PYTHON="$RPM_PYTHON" \
    >"$WORK/build-$NEXT_VERSION.log" 2>&1 &
BUILD2=$!
if [ -z "$RPM1" ] || [ -z "$SRPM1" ]; then
    fail "packages missing; stopping"
    printf '%s passed, %s failed, %s skipped\n' "$PASSED" "$FAILED" "$SKIPPED"
    exit 1
fi

# ---------------------------------------------------------------------------------------------------
phase "Package contents"
lint=$(rpmlint -r rpm/rpmlintrc "$NAME.spec" "$RPM1" "$SRPM1" 2>&1)
printf '%s\n' "$lint" >>"$LOG"
summary=$(grep -Eo '[0-9]+ errors, [0-9]+ warnings' <<<"$lint" | tail -1)
if [[ $summary =~ ^0\ errors ]]; then pass "rpmlint: $summary"; else fail "rpmlint: ${summary:-no summary}"; fi

files=$(rpm -qpl "$RPM1")
ok=1
for path in /usr/bin/$NAME $CONF /etc/$NAME/mcp-servers.json /etc/sysconfig/$NAME \
    /usr/lib/systemd/system/$UNIT /etc/logrotate.d/$NAME /var/log/$NAME /var/lib/$NAME \
    /usr/lib64/$NAME/venv/bin/twistd; do
    grep -qx "$path" <<<"$files" || { fail "rpm -qpl lists $path"; ok=0; }
done
if grep -q dropin.cache <<<"$files"; then fail "rpm -qpl: dropin.cache must not be a packaged file"; ok=0; fi
[ $ok = 1 ] && pass "rpm -qpl lists the binary, configs, unit, logrotate, sysconfig, log/state folders; no dropin.cache"

attrs=$(rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEFLAGS:fflags} %{FILENAMES}\n]' "$RPM1")
printf '%s\n' "$attrs" | grep -v /venv/ >>"$LOG"
want_attrs=(
    "-rw-r--r-- root:root cn $CONF"
    "-rw-r--r-- root:root cn /etc/$NAME/mcp-servers.json"
    "-rw------- root:root cn /etc/sysconfig/$NAME"
    "-rw-r--r-- root:root cn /etc/logrotate.d/$NAME"
    "drwxr-xr-x aichat:aichat  /var/log/$NAME"
    "drwxr-xr-x aichat:aichat  /var/lib/$NAME"
)
ok=1
for line in "${want_attrs[@]}"; do
    grep -qxF -- "$line" <<<"$attrs" || { fail "file attributes: want '$line'"; ok=0; }
done
[ $ok = 1 ] && pass "config files %config(noreplace) 0644 (sysconfig 0600), log/state folders 0755 aichat:aichat"

meta=$(rpm -qp --qf '%{NAME} %{VERSION} %{LICENSE} %{ARCH}' "$RPM1")
check "name, version, license, arch: $meta" test "$meta" = "$NAME $VERSION AGPL-3.0-only x86_64"
requires=$(rpm -qpR "$RPM1")
printf '%s\n' "$requires" >>"$LOG"
ok=1
for dep in 'systemd' 'nodejs >= 16.0' 'npm' '/usr/bin/python3.11'; do
    grep -qxF "$dep" <<<"$requires" || { fail "rpm -qpR lists '$dep'"; ok=0; }
done
[ $ok = 1 ] && pass "rpm -qpR: systemd, nodejs >= 16.0, npm, /usr/bin/python3.11"
scripts=$(rpm -qp --scripts "$RPM1")
printf '%s\n' "$scripts" >>"$LOG"
ok=1
for pattern in 'preinstall scriptlet' 'useradd -r -g aichat -d /var/lib/aichat-backend -s /sbin/nologin' \
    'postinstall scriptlet' 'preuninstall scriptlet' 'postuninstall scriptlet' 'getPlugins' \
    'preset|install-system-units' 'disable --now' 'try-restart|mark-restart-system-units' 'userdel aichat'; do
    grep -Eq -- "$pattern" <<<"$scripts" || { fail "rpm --scripts: missing '$pattern'"; ok=0; }
done
[ $ok = 1 ] && pass "rpm --scripts: useradd in %pre, systemd preset/stop/restart, plugin cache, userdel on erase"
srpm_files=$(rpm -qpl "$SRPM1" | sort | paste -sd' ' -)
check "SRPM carries the spec, the sources and the pinned wheels: $srpm_files" \
    test "$srpm_files" = "$NAME-$VERSION-wheels.tar.gz $NAME-$VERSION.tar.gz $NAME.spec"

unitdir=$WORK/payload
mkdir -p "$unitdir"
(cd "$unitdir" && rpm2cpio "$ROOT/$RPM1" | cpio -idm --quiet "./usr/lib/systemd/system/$UNIT")
security=$(systemd-analyze security --offline=true "$unitdir/usr/lib/systemd/system/$UNIT" 2>&1)
printf '%s\n' "$security" >>"$LOG"
score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$security")
if [ -n "$score" ] && awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'; then
    pass "systemd-analyze security --offline=true: exposure $score <= 2.0"
else
    fail "systemd-analyze security --offline=true: exposure ${score:-?} (want <= 2.0)"
fi

# ---------------------------------------------------------------------------------------------------
phase "Container root file system"
# shellcheck source=/dev/null
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
key=$(printf '%s\n' "$CACHE_FORMAT" "$suite" "$mirror" "$PKGS" | sha256sum | cut -c1-12)
BASE=$CACHE/rootfs-$suite-$key
(
    flock 9
    if [ ! -e "$BASE/.complete" ]; then
        note "debootstrap $suite ($PKGS) into $BASE (first run on this machine)"
        rm -rf "$BASE.tmp"
        debootstrap --variant=minbase --include="$PKGS" "$suite" "$BASE.tmp" "$mirror" >>"$LOG" 2>&1 || exit 1
        rm -rf "$BASE.tmp/var/cache/apt/archives/"*.deb
        touch "$BASE.tmp/.complete"
        rm -rf "$BASE"
        mv "$BASE.tmp" "$BASE"
    fi
) 9>"$CACHE/.lock"
check "container root file system ready ($BASE)" test -e "$BASE/.complete"

# MCP servers for the container, from the project's lock file (cached by its hash).
npmkey=$(cat package.json package-lock.json | sha256sum | cut -c1-12)
MCPDIR=$CACHE/npm-$npmkey
if [ ! -e "$MCPDIR/node_modules/@modelcontextprotocol/server-everything/package.json" ]; then
    rm -rf "$MCPDIR.tmp" && mkdir -p "$MCPDIR.tmp"
    cp package.json package-lock.json "$MCPDIR.tmp/"
    if [ -e node_modules/@modelcontextprotocol/server-everything/package.json ]; then
        cp -a node_modules "$MCPDIR.tmp/"
    else
        (cd "$MCPDIR.tmp" && npm ci --no-audit --no-fund --loglevel=error) >>"$LOG" 2>&1
    fi
    rm -rf "$MCPDIR" && mv "$MCPDIR.tmp" "$MCPDIR"
fi
check "npm MCP server-everything available for the container" \
    test -e "$MCPDIR/node_modules/@modelcontextprotocol/server-everything/dist/index.js"

phase "Boot systemd in the container"
# A machine name of its own: two containers of one directory would share nspawn's runtime folder.
systemd-nspawn -q -D "$BASE" --machine="aichat-st-$$" --register=no --keep-unit --boot --private-network \
    --volatile=overlay \
    --bind-ro="$ROOT/build/rpm/RPMS/x86_64:/mnt/rpms" --bind-ro="$MCPDIR:/opt/aichat-mcp" \
    --bind-ro="$ROOT/tests/system:/mnt/system-test" --console=pipe </dev/null >"$WORK/nspawn.log" 2>&1 &
NSPID=$!
# The container's PID 1 is the child of nspawn that has exec'd systemd (nspawn forks helpers first).
CPID=
for _ in $(seq 200); do
    for child in $(pgrep -P "$NSPID"); do
        if [ "$(cat "/proc/$child/comm" 2>/dev/null)" = systemd ]; then
            CPID=$child
            break 2
        fi
    done
    sleep 0.1
done
# PID 1 needs a moment before its bus answers.
state=
for _ in $(seq 60); do
    state=$(cx systemctl is-system-running --wait 2>&1)
    case $state in running | degraded | maintenance | stopping) break ;; esac
    kill -0 "$NSPID" 2>/dev/null || break
    sleep 0.5
done
if [ "$state" = running ] || [ "$state" = degraded ]; then
    pass "systemd booted in the container ($state)"
else
    fail "systemd booted in the container (${state:-no answer}; see $WORK/nspawn.log)"
    printf '%s passed, %s failed, %s skipped\n' "$PASSED" "$FAILED" "$SKIPPED"
    exit 1
fi

# ---------------------------------------------------------------------------------------------------
phase "Install"
check "rpm -ivh --nodeps ${RPM1##*/}" cx rpm -ivh --nodeps "${DBPATH[@]}" "/mnt/rpms/${RPM1##*/}"
passwd_line=$(cx getent passwd aichat)
check "user aichat: home /var/lib/$NAME, shell /sbin/nologin ($passwd_line)" \
    grep -Eq "^aichat:x:[0-9]+:[0-9]+:[^:]*:/var/lib/$NAME:/sbin/nologin\$" <<<"$passwd_line"
check "group aichat exists" cx getent group aichat
AICHAT_UID=$(cut -d: -f3 <<<"$passwd_line")
check "log and state folders 0755 aichat:aichat" \
    test "$(cx stat -c '%a %U:%G' /var/log/$NAME /var/lib/$NAME | sort -u)" = "755 aichat:aichat"
check "/etc/sysconfig/$NAME not world-readable" test "$(cx stat -c '%a' /etc/sysconfig/$NAME)" = 600
check "unit enabled per preset" cx systemctl is-enabled "$UNIT"
check "twistd plugin cache regenerated by %post" \
    cx test -s /usr/lib64/$NAME/venv/lib/python3.11/site-packages/twisted/plugins/dropin.cache
verify_err=$(cx systemd-analyze verify "/usr/lib/systemd/system/$UNIT" 2>&1 >/dev/null)
printf 'systemd-analyze verify stderr: %s\n' "$verify_err" >>"$LOG"
if [ -z "$verify_err" ]; then pass "systemd-analyze verify: silent"; else fail "systemd-analyze verify: $verify_err"; fi
check "aichat-backend -config $CONF -validate" cx aichat-backend -config "$CONF" -validate
version_out=$(cx aichat-backend -version 2>&1)
check "aichat-backend -version: $version_out" grep -q "$VERSION" <<<"$version_out"

# The operator configures an npm MCP server and edits config.yaml (kept on upgrade, .rpmsave on erase).
csh "cat > /etc/$NAME/mcp-servers.json" <<'EOF'
{
  "mcpServers": {
    "everything": {
      "description": "MCP reference server, installed with npm",
      "command": "node",
      "args": ["/opt/aichat-mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js", "stdio"],
      "timeout": 30
    }
  }
}
EOF
csh "sed -i 's/shutdown_grace_seconds: 10/shutdown_grace_seconds: 5  # edited by the system test/' $CONF"
check "edited configuration still validates" cx aichat-backend -config "$CONF" -validate

# ---------------------------------------------------------------------------------------------------
phase "Start"
t0=$(date +%s.%N)
check "systemctl start $UNIT (Type=notify: returns once READY=1)" cx systemctl start "$UNIT"
t1=$(date +%s.%N)
note "start took $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s"
check "/health answers 200 right after start" test "$(http_code /health)" = 200
check "status text from sd_notify (serving)" test "$(cx systemctl show -p StatusText --value "$UNIT")" = serving

tools_code=$(http_code /api/v1/mcp/tools)
if [ "$tools_code" = 404 ]; then
    skip "/api/v1/mcp/tools: route not in the daemon yet (404)"
    MCP=0
else
    MCP=1
    tools=""
    for _ in $(seq 50); do
        tools=$(cx curl -s --max-time 5 "http://127.0.0.1:$PORT/api/v1/mcp/tools")
        grep -q '"echo' <<<"$tools" && break
        sleep 0.2
    done
    printf 'tools: %s\n' "$tools" >>"$LOG"
    check "/api/v1/mcp/tools ($tools_code) lists the tools of the npm server (echo)" grep -q '"echo' <<<"$tools"
fi

pids=$(service_pids | paste -sd, -)
procs=$(cx ps -o user=,pid=,comm= -p "$pids" 2>/dev/null)
printf 'service processes:\n%s\n' "$procs" >>"$LOG"
check "daemon runs as aichat" test "$(cx ps -o user= -p "$(main_pid)")" = aichat
check "every process of the service runs as aichat ($(wc -l <<<"$procs"))" \
    test -z "$(awk '$1 != "aichat"' <<<"$procs")"
if [ $MCP = 1 ]; then
    check "MCP child (node) runs in the service, as aichat" grep -Eq '^aichat +[0-9]+ +node' <<<"$procs"
else
    if grep -q node <<<"$procs"; then pass "MCP child (node) runs as aichat"; else skip "MCP child: none started"; fi
fi
journal=$(cx journalctl --no-pager -o cat -u "$UNIT")
check "journalctl -u $NAME shows the start" grep -q "Started $UNIT" <<<"$journal"
check "journalctl -u $NAME shows the daemon's own start-up lines" grep -q "Listening on" <<<"$journal"

# ---------------------------------------------------------------------------------------------------
phase "Log rotation under load"
LOGDIR=/var/log/$NAME
csh "python3 /mnt/system-test/load.py --port $PORT --seconds 4 >/tmp/load.out 2>/tmp/load.err" &
loadpid=$!
sleep 1.5
main_before=$(main_pid)
check "logrotate -f /etc/logrotate.d/$NAME (postrotate: systemctl reload)" \
    cx logrotate -f /etc/logrotate.d/$NAME
wait "$loadpid"
load_rc=$?
sleep 0.5
marker="after-rotation-$$"
http_code "/health?marker=$marker" >/dev/null
sleep 0.5
check "load ran without errors" test $load_rc = 0
sent=$(cx cat /tmp/load.out | awk '$2 == 200 { print $1 }' | sort -n)
nsent=$(wc -l <<<"$sent")
cx ls -l "$LOGDIR" >>"$LOG"
check "rotated file aichat-backend.log.1 exists" cx test -s "$LOGDIR/aichat-backend.log.1"
check "new aichat-backend.log is 0640 aichat:aichat" \
    test "$(cx stat -c '%a %U:%G' "$LOGDIR/aichat-backend.log")" = "640 aichat:aichat"
check "reload kept the same daemon (MainPID)" test "$(main_pid)" = "$main_before"
check "lines after the reload are in the new file" cx grep -q "marker=$marker" "$LOGDIR/aichat-backend.log"
check "... and not in the rotated one" cx sh -c "! grep -q 'marker=$marker' $LOGDIR/aichat-backend.log.1"
logged=$(csh "cd $LOGDIR && zcat -f aichat-backend.log*" | grep -o 'GET /health?seq=[0-9]* ' | sed 's/.*seq=\([0-9]*\).*/\1/' | sort -n)
in_old=$(cx grep -c 'GET /health?seq=' "$LOGDIR/aichat-backend.log.1")
in_new=$(cx grep -c 'GET /health?seq=' "$LOGDIR/aichat-backend.log")
note "$nsent numbered requests: $in_old logged before the rotation, $in_new after"
dupes=$(uniq -d <<<"$logged" | wc -l)
lost=$(comm -23 <(sort <<<"$sent") <(sort -u <<<"$logged") | grep -c .)
check "no access-log line lost ($lost) or doubled ($dupes) across the rotation ($nsent requests)" \
    test "$nsent" -gt 100 -a "$lost" = 0 -a "$dupes" = 0
check "the rotation happened during the load (lines in both files)" test "$in_old" -gt 0 -a "$in_new" -gt 0

# ---------------------------------------------------------------------------------------------------
phase "Restart and stop"
old_main=$(main_pid)
old_pids=$(service_pids)
check "systemctl restart $UNIT" cx systemctl restart "$UNIT"
new_main=$(main_pid)
check "new daemon after restart ($old_main -> $new_main), /health 200" \
    test "$new_main" != "$old_main" -a "$(http_code /health)" = 200
orphans=""
for pid in $old_pids; do
    cx test -e "/proc/$pid" && orphans="$orphans $pid"
done
check "restart left no orphan of the old service (old pids: $(echo "$old_pids" | paste -sd' ' -))" test -z "$orphans"
if [ $MCP = 1 ]; then
    for _ in $(seq 50); do
        cx ps -o comm= -p "$(service_pids | paste -sd, -)" 2>/dev/null | grep -q node && break
        sleep 0.2
    done
fi
before_stop=$(service_pids | paste -sd' ' -)
check "systemctl stop $UNIT" cx systemctl stop "$UNIT"
stopped="$(cx systemctl show -p ActiveState --value "$UNIT") $(cx systemctl show -p Result --value "$UNIT")"
stopped="$stopped $(cx systemctl show -p ExecMainStatus --value "$UNIT")"
check "stopped: inactive, result success, exit status 0 ($stopped)" test "$stopped" = "inactive success 0"
left=$(cx ps -eo uid=,pid=,comm= | awk -v u="$AICHAT_UID" '$1 == u')
check "stop left no process of aichat (had: $before_stop)" test -z "$left"

# ---------------------------------------------------------------------------------------------------
phase "Errors reach the operator"
csh "cp $CONF /root/config.good && printf 'bogus_section: 1\n' >> $CONF"
validate_out=$(cx aichat-backend -config "$CONF" -validate 2>&1)
validate_rc=$?
printf '%s\n' "$validate_out" >>"$LOG"
check "-validate exits 1 and names the bad key" test $validate_rc = 1 -a -n "$(grep bogus_section <<<"$validate_out")"
since=$(cx date '+%Y-%m-%d %H:%M:%S')
cx systemctl start "$UNIT" >>"$LOG" 2>&1
check "systemctl start fails with a broken config" test "$(cx systemctl is-active "$UNIT")" != active
check "journalctl -u $NAME shows the daemon's error" \
    grep -q bogus_section <<<"$(cx journalctl --no-pager -o cat -u "$UNIT" --since "$since")"
csh "cp /root/config.good $CONF"
cx systemctl stop "$UNIT" >>"$LOG" 2>&1
cx systemctl reset-failed "$UNIT" >>"$LOG" 2>&1

# ---------------------------------------------------------------------------------------------------
phase "Upgrade"
wait "$BUILD2"
build2_rc=$?
BUILD2=
cat "$WORK/build-$NEXT_VERSION.log" >>"$LOG"
check "make rpm VERSION=$NEXT_VERSION builds the upgrade" test $build2_rc = 0
RPM2=$(first build/rpm/RPMS/x86_64/$NAME-$NEXT_VERSION-$RELEASE.*x86_64.rpm)
check "start before the upgrade" cx systemctl start "$UNIT"
before=$(main_pid)
check "rpm -Uvh --nodeps ${RPM2##*/}" cx rpm -Uvh --nodeps "${DBPATH[@]}" "/mnt/rpms/${RPM2##*/}"
check "installed version is $NEXT_VERSION" test "$(rpmq -q --qf '%{VERSION}' $NAME)" = "$NEXT_VERSION"
check "edited config.yaml kept" cx grep -q "edited by the system test" "$CONF"
check "edited mcp-servers.json kept" cx grep -q '"everything"' /etc/$NAME/mcp-servers.json
after=$(main_pid)
check "service restarted by the upgrade (MainPID $before -> $after), active" \
    test "$after" != "$before" -a "$after" != 0 -a "$(cx systemctl is-active "$UNIT")" = active
health=$(cx curl -s --max-time 5 "http://127.0.0.1:$PORT/health")
check "/health reports $NEXT_VERSION: $health" grep -q "\"$NEXT_VERSION\"" <<<"$health"

# ---------------------------------------------------------------------------------------------------
phase "Erase"
check "rpm -e $NAME" rpmq -e $NAME
check "service stopped" test "$(cx systemctl is-active "$UNIT")" != active
left=$(cx ps -eo uid=,pid=,comm= | awk -v u="$AICHAT_UID" '$1 == u')
check "no process of aichat left" test -z "$left"
check "config.yaml.rpmsave keeps the edit" cx grep -q "edited by the system test" "$CONF.rpmsave"
check "mcp-servers.json.rpmsave kept" cx test -e /etc/$NAME/mcp-servers.json.rpmsave
check "unit file removed" cx test ! -e "/usr/lib/systemd/system/$UNIT"
check "private venv removed completely (no leftover plugin cache)" cx test ! -e /usr/lib64/$NAME
check "user aichat removed" cx sh -c '! getent passwd aichat'

# ---------------------------------------------------------------------------------------------------
printf '\nsystem test took %ss; details in %s\n' "$(elapsed)" "$LOG"
if [ "$FAILED" -gt 0 ]; then
    printf '\n--- last lines of %s\n' "$LOG"
    tail -n 40 "$LOG"
fi
printf '%s passed, %s failed, %s skipped\n' "$PASSED" "$FAILED" "$SKIPPED"
[ "$FAILED" = 0 ]
