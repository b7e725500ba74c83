//! temp
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let size: u64 = a[2].parse().unwrap();
    let t = std::time::Instant::now();
    benches::write_checkpoint_like(std::path::Path::new(&a[1]), size, 42).unwrap();
    eprintln!("gen {:?}", t.elapsed());
    if a.len() > 3 {
        let t = std::time::Instant::now();
        let n = benches::write_rewritten_copy(std::path::Path::new(&a[1]), std::path::Path::new(&a[3]), 0.05, 43).unwrap();
        eprintln!("copy {:?} {n}", t.elapsed());
    }
}
