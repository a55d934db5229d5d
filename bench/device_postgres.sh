#!/usr/bin/env bash
# PostgreSQL on a device machine (which has none) for bench_scale.py: run from the repo root with
# .pg/ carried, made from the pgserver wheel (portable PostgreSQL 16 binaries, needing only libc/libz):
#   pip download --no-deps pgserver && unzip it; mkdir .pg && cp -r pgserver/pginstall/{lib,share} .pg/;
#   mkdir .pg/bin .pg/libs && cp pgserver/pginstall/bin/{postgres,initdb,pg_ctl,psql} .pg/bin/ && cp pgserver.libs/* .pg/libs/
# Starts it as an unprivileged user (postgres refuses root) on 127.0.0.1:${PGPORT:-5432}, trust auth, database test.
set -e
id pgu >/dev/null 2>&1 || useradd -M pgu
rm -rf /tmp/pg /tmp/pgd && cp -r .pg /tmp/pg && chmod -R a+rx /tmp/pg && mkdir /tmp/pgd && chown pgu /tmp/pgd
su pgu -s /bin/bash -c "export LD_LIBRARY_PATH=/tmp/pg/libs; /tmp/pg/bin/initdb -D /tmp/pgd -U postgres --auth=trust -E UTF8 >/tmp/pginit.log 2>&1 && /tmp/pg/bin/pg_ctl -D /tmp/pgd -o '-p ${PGPORT:-5432} -k /tmp -c max_connections=600 -c shared_buffers=2GB' -l /tmp/pgd/log -w start >/dev/null"
LD_LIBRARY_PATH=/tmp/pg/libs /tmp/pg/bin/psql -h 127.0.0.1 -p ${PGPORT:-5432} -U postgres -qc "create database test"
echo "postgres up: $(LD_LIBRARY_PATH=/tmp/pg/libs /tmp/pg/bin/psql -h 127.0.0.1 -p ${PGPORT:-5432} -U postgres -d test -tAc 'show max_connections')"
