"""The hub's xDS control plane: Istio networking translated per proxy, served over ADS."""
