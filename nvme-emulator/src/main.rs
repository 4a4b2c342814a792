fn main() {
    eprintln!("nvme-emulator: not built yet");
    std::process::exit(2);
}
