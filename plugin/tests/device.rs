//! Device selection with libtorch's CUDA backend force-loaded. This machine class (and CI) has no GPU:
//! asking for one must fail with a message that says why, and `auto` must fall back to the CPU.

use gainguard::device::{load_cuda_backend, parse_device, CudaBackend};

#[test]
fn the_cuda_backend_of_the_wheel_is_found_next_to_libtorch_cpu() {
    match load_cuda_backend() {
        // The PyPI wheel ships libtorch_cuda.so; with its nvidia-* dependencies it loads even without a GPU.
        CudaBackend::Loaded(path) => assert!(path.ends_with("libtorch_cuda.so"), "{path}"),
        // A CPU-only libtorch, or missing CUDA runtime libraries: the message names the file.
        CudaBackend::Unavailable(why) => assert!(why.contains("libtorch"), "{why}"),
    }
}

#[test]
fn asking_for_cuda_without_a_gpu_is_a_clear_error_and_auto_falls_back_to_cpu() {
    if tch::Cuda::is_available() {
        // On a GPU machine the backend must have made CUDA visible.
        assert_eq!(parse_device("cuda").unwrap(), tch::Device::Cuda(0));
        return;
    }
    let e = parse_device("cuda").unwrap_err();
    assert!(e.contains("`cuda`") && e.contains("CUDA is not available"), "{e}");
    assert_eq!(parse_device("auto").unwrap(), tch::Device::Cpu);
    assert_eq!(parse_device("cpu").unwrap(), tch::Device::Cpu);
    assert!(parse_device("tpu").unwrap_err().contains("expected cpu, auto, cuda or cuda:N"));
}
