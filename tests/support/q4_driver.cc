// Runs the "forward" function of a compiled Relax VM library (built by tests/test_tvm_kernels.py:
// an int4 linear layer after kernels.optimize_for_cpu) on raw input files and writes the output.
// Built with aarch64-linux-gnu-g++ against the aarch64 TVM runtime wheel and run under qemu-aarch64,
// it is the aarch64 half of the kernel test (no aarch64 Python needed).
//   q4_driver LIB.so q4|q8 m k n_out x.f32 qw sc.f16 out.f32   (x [1, m, k], out [1, m, n_out];
//   qw uint32 [n_out, k/8] for q4, int8 [n_out, k] for q8)
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

struct CPUAlloc {
  void AllocData(DLTensor* t) { t->data = std::malloc(tvm::ffi::GetDataSize(*t)); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static tvm::ffi::Tensor load(const char* path, tvm::ffi::Shape shape, DLDataType dt) {
  tvm::ffi::Tensor t = tvm::ffi::Tensor::FromNDAlloc(CPUAlloc(), shape, dt, DLDevice{kDLCPU, 0});
  size_t n = tvm::ffi::GetDataSize(*t.GetDLTensorPtr());
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(t.data_ptr(), 1, n, f) != n) {
    std::fprintf(stderr, "cannot read %zu bytes from %s\n", n, path);
    std::exit(2);
  }
  std::fclose(f);
  return t;
}

int main(int argc, char** argv) {
  if (argc != 10) {
    std::fprintf(stderr, "usage: q4_driver LIB q4|q8 m k n_out x qw sc out\n");
    return 2;
  }
  bool q8 = std::strcmp(argv[2], "q8") == 0;
  int64_t m = std::atoll(argv[3]), k = std::atoll(argv[4]), n = std::atoll(argv[5]);
  tvm::ffi::Tensor x = load(argv[6], tvm::ffi::Shape({1, m, k}), DLDataType{kDLFloat, 32, 1});
  tvm::ffi::Tensor qw = q8 ? load(argv[7], tvm::ffi::Shape({n, k}), DLDataType{kDLInt, 8, 1})
                           : load(argv[7], tvm::ffi::Shape({n, k / 8}), DLDataType{kDLUInt, 32, 1});
  tvm::ffi::Tensor sc = load(argv[8], tvm::ffi::Shape({n, k / 32}), DLDataType{kDLFloat, 16, 1});

  tvm::ffi::Module lib = tvm::ffi::Module::LoadFromFile(argv[1]);
  tvm::ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<tvm::ffi::Module>();
  // device (cpu, 0) with the pooled allocator (2), twice: the model device and the host device
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2, static_cast<int>(kDLCPU), 0, 2);
  tvm::ffi::Tensor y = vm->GetFunction("forward").value()(x, qw, sc).cast<tvm::ffi::Tensor>();

  FILE* out = std::fopen(argv[9], "wb");
  std::fwrite(y.data_ptr(), 4, static_cast<size_t>(m * n), out);
  std::fclose(out);
  std::printf("ok %lld x %lld\n", static_cast<long long>(m), static_cast<long long>(n));
  return 0;
}
