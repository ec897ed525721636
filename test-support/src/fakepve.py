"""Runs fakepve (PyPI) for handoff's tests: one scenario from a JSON file, on loopback.

fakepve's own command line serves guests from a file but has no API tokens, permissions,
locks or timeouts; those are set through its documented Python API (FakePve, FakeVm), so
this script starts the same server the command line does, with them. It prints one JSON
line once it listens: {"url", "fingerprint", "ca_file"}; it serves until killed.
"""

import asyncio
import hashlib
import json
import os
import sys

from fakepve import FakePve
from fakepve.certs import make_cert


async def main(path):
    with open(path) as f:
        s = json.load(f)
    directory = os.path.dirname(os.path.abspath(path))
    host = s.get('host', '127.0.0.1')
    pve = FakePve(user='root@pam', password=s.get('password', 'secret'), host=host, port=s.get('port', 0))
    pve.time_scale = s.get('time_scale', 0.01)
    if 'shutdown_default_timeout' in s:
        pve.shutdown_default_timeout = s['shutdown_default_timeout']
    if 'lock_wait' in s:
        pve.lock_wait = s['lock_wait']
    for tokenid, secret in s.get('tokens', {}).items():
        pve.apitokens[tokenid] = secret
    for user, acl_path, privs in s.get('grants', []):
        pve.grant(user, acl_path, *privs)
    for g in s.get('guests', []):
        vm = pve.add_vm(g['vmid'], g['name'], node=g.get('node', 'pve1'), status=g.get('status', 'stopped'),
                        config=g.get('config', {}), lock=g.get('lock'))
        vm.acpi = g.get('acpi', True)
        for key in ('shutdown_secs', 'start_secs', 'stop_secs', 'start_error'):
            if key in g:
                setattr(vm, key, g[key])
        # The guest agent's answers by command ({} answers each with fakepve's defaults);
        # absent: no agent. `stats`: status/current fields such as uptime.
        if 'agent' in g:
            vm.agent = g['agent']
        vm.stats.update(g.get('stats', {}))
    certfile, keyfile, der = make_cert(directory, hosts=(host,))
    await pve.start(certfile, keyfile)
    digest = hashlib.sha256(der).hexdigest().upper()
    fingerprint = ':'.join(digest[i:i + 2] for i in range(0, len(digest), 2))
    print(json.dumps({'url': pve.url, 'fingerprint': fingerprint, 'ca_file': certfile}), flush=True)
    await asyncio.Event().wait()


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1]))
