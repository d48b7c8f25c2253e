#!/usr/bin/env bash
# `make package`: for each PostgreSQL version (PG=NN for one), a release build packaged as
#
#   packages/postgresql-NN-outbox-ext_<version>_amd64.deb   laid out as Debian and the PostgreSQL
#       apt repository lay out extensions: /usr/lib/postgresql/NN/lib/outbox_ext.so and
#       /usr/share/postgresql/NN/extension/outbox_ext*
#   packages/outbox_ext-<version>-pgNN-linux-amd64.tar.gz   the same files, for other layouts
#
# The .deb depends on postgresql-NN and on the shared libraries the module links (computed by
# dpkg-shlibdeps).
set -euo pipefail
cd "$(dirname "$0")/.."
requested=${PG_VERSIONS:-${PG:-}}   # before common.sh, which selects PG=15 by default
. scripts/common.sh

read -r -a VERSIONS <<<"${requested:-${SUPPORTED_PG_VERSIONS[*]}}"
OUT=${PACKAGE_DIR:-$PWD/packages}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
mkdir -p "$OUT"

for v in "${VERSIONS[@]}"; do
    check_pg_version "$v"
    fetch_pg "$v"
    use_pg "$v"
    name=postgresql-$v-outbox-ext
    work=$(mktemp -d)
    echo "==> PostgreSQL $v: building $name $VERSION"
    cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$work/pgrx" >/dev/null

    # pgrx lays the files out under the paths of the pg_config it built with (for 16-18 the
    # test fixtures' own); the packages use Debian's.
    root=$work/root
    lib=$root/usr/lib/postgresql/$v/lib
    ext=$root/usr/share/postgresql/$v/extension
    doc=$root/usr/share/doc/$name
    install -d "$lib" "$ext" "$doc" "$root/DEBIAN"
    install -m 0644 "$(find "$work/pgrx" -name outbox_ext.so -print -quit)" "$lib/"
    find "$work/pgrx" -path '*/extension/outbox_ext*' \( -name '*.control' -o -name '*.sql' \) \
        -exec install -m 0644 {} "$ext/" \;
    [ -f "$ext/outbox_ext.control" ] && [ -f "$ext/outbox_ext--$VERSION.sql" ] || {
        echo "pgrx package produced no control file or install script for $VERSION" >&2; exit 1; }
    install -m 0644 README.md "$doc/"
    printf 'outbox_ext %s\nLicense: Apache-2.0\n' "$VERSION" > "$doc/copyright"
    strip --strip-unneeded "$lib/outbox_ext.so"

    mkdir -p "$work/debian"
    printf 'Source: outbox-ext\n\nPackage: %s\nArchitecture: any\n' "$name" > "$work/debian/control"
    shlibs=$(cd "$work" && dpkg-shlibdeps -O --ignore-missing-info "$lib/outbox_ext.so" 2>/dev/null |
        sed -n 's/^shlibs:Depends=//p')
    cat > "$root/DEBIAN/control" <<CONTROL
Package: $name
Version: $VERSION
Architecture: amd64
Maintainer: outbox_ext developers <outbox-ext@users.noreply.github.com>
Depends: postgresql-$v${shlibs:+, $shlibs}
Section: database
Priority: optional
Installed-Size: $(du -sk "$root/usr" | cut -f1)
Description: transactional outbox for PostgreSQL $v with an in-database relay to Kafka
 outbox.emit() records an event in the caller's transaction; a background worker reads the
 committed events through logical decoding and produces them to Kafka. Add outbox_ext to
 shared_preload_libraries and set wal_level = logical, then CREATE EXTENSION outbox_ext.
CONTROL
    deb=$OUT/${name}_${VERSION}_amd64.deb
    dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
    tarball=$OUT/outbox_ext-$VERSION-pg$v-linux-amd64.tar.gz
    tar -C "$root" --owner=0 --group=0 -czf "$tarball" usr
    rm -rf "$work"
    echo "    $deb"
    echo "    $tarball"
done
