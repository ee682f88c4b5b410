"""containerd's own content store as registryd's store (``[storage] driver = "containerd"``).

What the node's containerd holds is what registryd serves, and what is pushed
to registryd is at once an image containerd can run: one copy per node.
registryd talks to containerd over its gRPC API (``client``), maps repository
names to image names (``names``), reads and writes content (``blobs``) and
images (``repositories``), and keeps containerd's garbage collector away from
what it writes with leases and ``containerd.io/gc.ref.content.*`` labels
(``labels``). ``store.ContainerdStore`` puts them together as a Store.
"""
