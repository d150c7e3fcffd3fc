#!/bin/sh
# Build the nnf-dm and nnf-clientmount RPMs (and SRPMs) from this workspace.
#
#   rpm/build.sh            release binaries; results in target/rpmbuild/{RPMS/<arch>,SRPMS}
#
# Environment:
#   NNF_RPM_PROFILE=debug   package debug binaries instead (fast, for tests)
#   NNF_RPM_BIN_DIR=DIR     take nnf-dm and clientmountd from DIR and run no
#                           cargo (for tests running under `cargo test`, which
#                           holds the target directory's lock)
#   NNF_RPM_TOPDIR=DIR      rpmbuild _topdir (default: target/rpmbuild)
#   CARGO_TARGET_DIR        honoured as cargo does
#
# The binaries are compiled here, outside rpmbuild; each spec packages a
# staged tarball (Source0) of prebuilt files, so no toolchain is needed inside
# rpmbuild and the SRPM still carries everything the RPM is made from.
set -eu

die() {
    echo "rpm/build.sh: $*" >&2
    exit 1
}

cd "$(dirname "$0")/.."
repo=$PWD

command -v rpmbuild >/dev/null || die "rpmbuild not found (install rpm-build)"

# Version from [workspace.package]; RPM forbids '-' in Version, and '~' sorts
# pre-releases (0.2.0-rc1 -> 0.2.0~rc1) before the release as Cargo does.
version=$(awk '
    /^\[/ { section = $0; next }
    section == "[workspace.package]" && $1 == "version" {
        gsub(/[" ]/, "", $3); print $3; exit
    }' Cargo.toml)
[ -n "$version" ] || die "no version in [workspace.package] of Cargo.toml"
version=$(printf '%s' "$version" | tr '-' '~')

profile=${NNF_RPM_PROFILE:-release}
case $profile in
release) cargo_profile_flag=--release ;;
debug) cargo_profile_flag= ;;
*) die "NNF_RPM_PROFILE must be release or debug, not '$profile'" ;;
esac

if [ -n "${NNF_RPM_BIN_DIR:-}" ]; then
    bin_dir=$NNF_RPM_BIN_DIR
else
    # shellcheck disable=SC2086 # the empty flag must vanish
    cargo build $cargo_profile_flag --locked -p nnf-dm -p clientmountd
    bin_dir=${CARGO_TARGET_DIR:-$repo/target}/$profile
fi

for f in README.md LICENSE; do
    [ -f "$f" ] || die "$repo/$f is missing; both packages ship it"
done

topdir=${NNF_RPM_TOPDIR:-$repo/target/rpmbuild}
mkdir -p "$topdir/SOURCES" "$topdir/SPECS" "$topdir/BUILD" "$topdir/RPMS" "$topdir/SRPMS"
stage_root=$topdir/stage
rm -rf "$stage_root"

# <package>:<binary>, both names as upstream.
for pair in nnf-dm:nnf-dm nnf-clientmount:clientmountd; do
    pkg=${pair%%:*}
    bin=${pair#*:}
    exe=$bin_dir/$bin
    [ -x "$exe" ] || die "$exe not found or not executable"

    stage=$stage_root/$pkg-$version
    mkdir -p "$stage/bin" "$stage/systemd"
    cp "$exe" "$stage/bin/$bin"
    cp "systemd/$bin.service" "$stage/systemd/"
    cp "systemd/$bin.override.conf.example" README.md LICENSE "$stage/"
    # Man pages and completions come from the binary's own clap definition.
    "$exe" generate-docs "$stage/docs" ||
        die "'$exe generate-docs' failed (is the hidden subcommand wired into $bin?)"
    [ -f "$stage/docs/man1/$bin.1" ] || die "$exe generate-docs wrote no man1/$bin.1"

    tar -czf "$topdir/SOURCES/$pkg-$version.tar.gz" -C "$stage_root" "$pkg-$version"
    cp "rpm/$pkg.spec" "$topdir/SPECS/"
    rpmbuild -ba \
        --define "_topdir $topdir" \
        --define "pkgversion $version" \
        "$topdir/SPECS/$pkg.spec"
done

rm -rf "$stage_root"
echo "RPMs:"
find "$topdir/RPMS" "$topdir/SRPMS" -name '*.rpm' -newer "$topdir/SOURCES/nnf-dm-$version.tar.gz" -print
