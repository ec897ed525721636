fn main() {
    println!("handoff");
}
