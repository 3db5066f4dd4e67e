# Sourced by run.sh and sweeps.sh (needs BIN and WORK set): puts cuBLAS, NVRTC and the driver on the
# library path (a CUDA install and/or the nvidia-* wheels next to PyTorch), then the libraries package.sh
# packed beside the binary (OpenBLAS, fontconfig, ...) last, so the machine's own copies win.
libdirs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 \
         $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | tr ' ' '\n' | sed 's|$|/nvidia/*/lib|'); do
  for dd in $d; do
    # any one of them is enough: the wheels put cuBLAS and NVRTC in separate folders
    if compgen -G "$dd/libcublas.so*" >/dev/null || compgen -G "$dd/libnvrtc.so*" >/dev/null \
       || compgen -G "$dd/libcuda.so*" >/dev/null; then libdirs="$libdirs:$dd"; fi
  done
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ -f "$(dirname "$BIN")/lib.tar.xz" ]; then
  tar -C "$WORK" -xJf "$(dirname "$BIN")/lib.tar.xz" && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$WORK/lib"
fi
export OPENBLAS_NUM_THREADS=1
