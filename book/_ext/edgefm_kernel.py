"""A Sphinx extension: the kernels that execute the chapters talk to the build over encrypted sockets.

ipykernel (7.3 and later) warns at every start when its ZeroMQ sockets run over TCP without
encryption, so each chapter of a build printed that warning. jupyter_client can give a kernel
CurveZMQ keys when its kernelspec declares support (``transport_encryption = "auto"``, the setting
the Jupyter enhancement proposal gives operators); myst-nb and jupyter-cache create their kernel
managers with no configuration, so this extension makes "auto" the managers' default.
"""

from __future__ import annotations


def encrypt_kernel_transport() -> bool:
    """Make CurveZMQ encryption the default of every kernel manager whose kernel supports it;
    returns whether it could (pyzmq built without CurveZMQ, or an older jupyter_client: no)."""
    import zmq
    from jupyter_client.manager import KernelManager

    if not zmq.has("curve") or not hasattr(KernelManager, "transport_encryption"):
        return False
    KernelManager.transport_encryption.default_value = "auto"
    return True


def setup(app) -> dict:
    """Sphinx's entry point (``local_extensions`` in ``_config.yml``)."""
    encrypt_kernel_transport()
    return {"parallel_read_safe": True, "parallel_write_safe": True}
