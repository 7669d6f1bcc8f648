{
  "targets": [
    {
      "target_name": "lora_gateway_blas",
      "sources": ["blas.c"],
      "include_dirs": ["/usr/include/x86_64-linux-gnu", "/usr/include/openblas"],
      "libraries": ["-lopenblas"],
      "cflags": ["-O3", "-Wall", "-march=native"]
    }
  ]
}
