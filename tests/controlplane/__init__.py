"""Tests against a real kube-apiserver, etcd and kube-controller-manager on loopback."""
