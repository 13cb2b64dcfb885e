"""测试用网络守卫：子进程通过 PYTHONPATH 加载它，任何非回环连接都被拒绝并记录到 $NETGUARD_LOG。"""
import os
import socket

_LOG = os.environ.get("NETGUARD_LOG")
_LOCAL = ("127.", "::1", "localhost", "0.0.0.0")


def _record(what: str) -> None:
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as f:
            f.write(what + "\n")


def _is_local(host) -> bool:
    return host is None or str(host).startswith(_LOCAL)


_orig_connect = socket.socket.connect
_orig_connect_ex = socket.socket.connect_ex
_orig_getaddrinfo = socket.getaddrinfo


def _guard(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
        _record(f"connect {address}")
        raise OSError(f"netguard: 测试中禁止联网（{address}）")


def connect(self, address):
    _guard(self, address)
    return _orig_connect(self, address)


def connect_ex(self, address):
    _guard(self, address)
    return _orig_connect_ex(self, address)


def getaddrinfo(host, *a, **kw):
    if not _is_local(host):
        _record(f"dns {host}")
        raise socket.gaierror(f"netguard: 测试中禁止 DNS 查询（{host}）")
    return _orig_getaddrinfo(host, *a, **kw)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.getaddrinfo = getaddrinfo
