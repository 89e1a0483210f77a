"""A Sphinx extension: the kernels that execute the chapters talk to the build over encrypted sockets.

ipykernel (7.3 and later) warns at every start when its ZeroMQ sockets run over TCP without
encryption, so each chapter of a build printed that warning. jupyter_client can give a kernel
CurveZMQ keys when its kernelspec declares support (``transport_encryption = "auto"``, the setting
the Jupyter enhancement proposal gives operators); myst-nb and jupyter-cache create their kernel
managers with no configuration, so this extension makes "auto" the managers' default.
"""

from __future__ import annotations


def encrypt_kernel_transport() -> None:
    """Make CurveZMQ encryption the default of every kernel manager whose kernel supports it (unless
    pyzmq was built without CurveZMQ, or jupyter_client predates the setting)."""
    import zmq
    from jupyter_client.manager import KernelManager

    if zmq.has("curve") and hasattr(KernelManager, "transport_encryption"):
        KernelManager.transport_encryption.default_value = "auto"


def setup(app) -> dict:
    """Sphinx's entry point (``local_extensions`` in ``_config.yml``)."""
    encrypt_kernel_transport()
    return {"parallel_read_safe": True, "parallel_write_safe": True}
