# rpm.mk: RPM packaging targets of aichat-backend (see PACKAGING.md). Included by the Makefile
# (`include rpm.mk`); also usable alone: `make -f rpm.mk rpm VERSION=1.1.0 RELEASE=2`.
#
#   tarball        aichat-backend-$(VERSION).tar.gz (the project's files, Source0)
#   rpm-wheels     build/rpm/SOURCES/aichat-backend-$(VERSION)-wheels.tar.gz (pinned wheels, Source1)
#   rpm-setup      build/rpm/{BUILD,BUILDROOT,RPMS,SOURCES,SPECS,SRPMS}
#   rpm / srpm     binary + source RPM / source RPM only
#   rpm-check      list the files of the built package;  rpm-lint: rpmlint with rpm/rpmlintrc
#   rpm-install    rpm -ivh the built package;  rpm-uninstall: rpm -e aichat-backend
#   system-test    build, lint, then install and operate the package under a real systemd (container)
#   clean-rpm      remove all of the above build output
#
# On hosts whose rpm lacks the systemd macros (Debian), rpmbuild loads rpm/macros.debian-compat and runs
# with --nodeps, and install/erase use --nodeps and the system-wide database /var/lib/rpm.

VERSION ?= 1.0.0
RELEASE ?= 1

RPM_NAME := aichat-backend
RPM_ARCH := x86_64
RPM_TOPDIR := $(CURDIR)/build/rpm
RPM_TARBALL := $(RPM_NAME)-$(VERSION).tar.gz
RPM_WHEELS := $(RPM_TOPDIR)/SOURCES/$(RPM_NAME)-$(VERSION)-wheels.tar.gz
# A Python with pip, to download the wheels (any version: the target is fixed below).
RPM_PYTHON ?= python3
# The wheels' target: the venv's CPython 3.11 on x86_64 glibc >= 2.28 (RHEL 8+).
RPM_WHEEL_TARGET := --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
	--abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	--platform any

# Debian/Ubuntu compatibility, decided once per make run.
RPM_NATIVE_MACROS := $(shell rpm --eval '%{?systemd_post:yes}' 2>/dev/null)
ifeq ($(RPM_NATIVE_MACROS),yes)
RPMBUILD_COMPAT :=
RPM_DB_FLAGS :=
else
RPMBUILD_COMPAT := --load=$(CURDIR)/rpm/macros.debian-compat --nodeps
RPM_DB_FLAGS := --nodeps --dbpath /var/lib/rpm
endif
RPMBUILD_FLAGS := $(RPMBUILD_COMPAT) --define "_topdir $(RPM_TOPDIR)" \
	--define "_version $(VERSION)" --define "_release $(RELEASE)"
RPM_DIST := $(shell rpm $(filter --load=%,$(RPMBUILD_COMPAT)) --eval '%{?dist}' 2>/dev/null)
RPM_FILE := $(RPM_TOPDIR)/RPMS/$(RPM_ARCH)/$(RPM_NAME)-$(VERSION)-$(RELEASE)$(RPM_DIST).$(RPM_ARCH).rpm
RPM_SRPM_FILE := $(RPM_TOPDIR)/SRPMS/$(RPM_NAME)-$(VERSION)-$(RELEASE)$(RPM_DIST).src.rpm
RPM_SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: clean-rpm tarball rpm-wheels rpm-setup rpm srpm rpm-check rpm-lint rpm-install rpm-uninstall \
	system-test

clean-rpm:
	rm -rf build/rpm build/tarball build/wheels build/system-test
	rm -f $(RPM_NAME)-*.tar.gz

# Source0: the files git tracks, as they are in the working tree (new files count once `git add`ed);
# outside a git checkout, the tree without build output.
tarball:
	rm -rf build/tarball $(RPM_TARBALL)
	mkdir -p build/tarball/$(RPM_NAME)-$(VERSION)
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git ls-files -z --cached \
		| xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
		| tar --null -cf - -T - | tar -xf - -C build/tarball/$(RPM_NAME)-$(VERSION); \
	else \
		tar --exclude=./build --exclude=./.git --exclude=./.venv --exclude=./node_modules \
			--exclude='./$(RPM_NAME)-*.tar.gz' --exclude='*.pyc' --exclude=dropin.cache -cf - . \
		| tar -xf - -C build/tarball/$(RPM_NAME)-$(VERSION); \
	fi
	tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00Z' \
		-czf $(RPM_TARBALL) -C build/tarball $(RPM_NAME)-$(VERSION)
	@echo "created $(RPM_TARBALL)"

# Source1: exactly the wheels of requirements.txt (+ build-only pip/setuptools), for cp311 x86_64.
rpm-wheels: rpm-setup
	rm -rf build/wheels && mkdir -p build/wheels/wheels
	$(RPM_PYTHON) -m pip download -q --disable-pip-version-check $(RPM_WHEEL_TARGET) \
		-d build/wheels/wheels -r requirements.txt -r rpm/build-requirements.txt
	tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2026-01-01 00:00Z' \
		-czf $(RPM_WHEELS) -C build/wheels wheels

rpm-setup:
	mkdir -p $(addprefix $(RPM_TOPDIR)/,BUILD BUILDROOT RPMS SOURCES SPECS SRPMS)
	cp $(RPM_NAME).spec $(RPM_TOPDIR)/SPECS/

rpm: rpm-setup tarball rpm-wheels
	cp $(RPM_TARBALL) $(RPM_TOPDIR)/SOURCES/
	rpmbuild -ba $(RPMBUILD_FLAGS) $(RPM_TOPDIR)/SPECS/$(RPM_NAME).spec
	@ls -l $(RPM_FILE) $(RPM_SRPM_FILE)

srpm: rpm-setup tarball rpm-wheels
	cp $(RPM_TARBALL) $(RPM_TOPDIR)/SOURCES/
	rpmbuild -bs $(RPMBUILD_FLAGS) $(RPM_TOPDIR)/SPECS/$(RPM_NAME).spec
	@ls -l $(RPM_SRPM_FILE)

rpm-check:
	rpm -qpl $(RPM_FILE)

rpm-lint:
	rpmlint -r rpm/rpmlintrc $(RPM_NAME).spec $(RPM_FILE) $(RPM_SRPM_FILE)

rpm-install:
	$(RPM_SUDO) rpm -ivh $(RPM_DB_FLAGS) $(RPM_FILE)

rpm-uninstall:
	$(RPM_SUDO) rpm -e $(RPM_DB_FLAGS) $(RPM_NAME)

system-test:
	bash tests/system/run.sh
