"""Untrusted bytes to tensors and back: the pickle loop and its admitted globals, zip
directories and members, storages, lazy and sharded safetensors, remote files, the
atomic writer."""
