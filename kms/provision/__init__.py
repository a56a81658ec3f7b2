"""Setting KMEs up before they run: ``peers`` (``qkms peer export|add|link``) joins KMEs into a
network by editing the working directories ``qkms init`` made (``kms.provision.workdir``). It sits above the
runtime and the peer package; nothing below imports it."""
