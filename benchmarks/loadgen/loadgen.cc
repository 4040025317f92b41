// A compiled gRPC load generator: unary calls of one pre-serialized request, back to back, on N connections.
//
//   loadgen --target HOST:PORT --request FILE [--method PATH] [--connections N] [--warmup N]
//           [--seconds S] [--latencies FILE]
//
// Each connection is a thread with a channel of its own (a distinct channel argument, so gRPC does not share
// one subchannel between them) and one call in flight. It warms up (a failed warm-up call: the reason on
// stderr, exit 1 at once), prints "ready", waits for a line on stdin, calls for S seconds, and prints one JSON
// line: requests (answered OK), failures by status code name, requests_per_s, p50/p90/p99/max latency in ms
// (OK calls only), cpu_s (this process's user + system CPU over the timed part, getrusage) and wall_s.
// --latencies FILE: every OK call's latency, in seconds, as little-endian float64 (for exact merged
// percentiles across processes). No generated code: requests and replies are raw bytes (GenericStub).
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

using Clock = std::chrono::steady_clock;

namespace {

const char* const kCodeNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                  "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                  "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                  "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};

std::string code_name(grpc::StatusCode code) {
  int c = static_cast<int>(code);
  return c >= 0 && c <= 16 ? kCodeNames[c] : "CODE_" + std::to_string(c);
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", ch);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

double cpu_seconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

struct Options {
  std::string target, method = "/inference.GRPCInferenceService/ModelInfer", request_file, latencies_file;
  int connections = 1, warmup = 1;
  double seconds = 5.0;
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "loadgen: " << why
            << "\nusage: loadgen --target HOST:PORT --request FILE [--method PATH] [--connections N] [--warmup N]"
               " [--seconds S] [--latencies FILE]\n";
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; i += 2) {
    std::string flag = argv[i];
    if (i + 1 >= argc) usage(flag + " needs a value");
    std::string value = argv[i + 1];
    try {
      if (flag == "--target") o.target = value;
      else if (flag == "--method") o.method = value;
      else if (flag == "--request") o.request_file = value;
      else if (flag == "--latencies") o.latencies_file = value;
      else if (flag == "--connections") o.connections = std::stoi(value);
      else if (flag == "--warmup") o.warmup = std::stoi(value);
      else if (flag == "--seconds") o.seconds = std::stod(value);
      else usage("unknown argument " + flag);
    } catch (const std::logic_error&) {
      usage("bad value for " + flag + ": " + value);
    }
  }
  if (o.target.empty() || o.request_file.empty()) usage("--target and --request are required");
  if (o.connections < 1 || o.warmup < 0 || o.seconds <= 0) usage("--connections >= 1, --warmup >= 0, --seconds > 0");
  return o;
}

// The start line: every connection waits here after its warm-up until main has read "go".
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  int warmed = 0;
  bool open = false;
  Clock::time_point end;
};

struct Connection {
  std::vector<double> latencies;  // seconds, OK calls
  std::map<std::string, long> failures;
  std::string first_failure;
};

void run(const Options& o, const grpc::ByteBuffer& request, int index, Gate& gate, Connection& mine) {
  grpc::ChannelArguments args;
  args.SetInt("outrider.loadgen.connection", index);  // a distinct argument: a subchannel of its own
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  grpc::GenericStub stub(grpc::CreateCustomChannel(o.target, grpc::InsecureChannelCredentials(), args));
  grpc::CompletionQueue cq;
  auto call = [&](grpc::Status& status) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    grpc::ByteBuffer reply;
    auto rpc = stub.PrepareUnaryCall(&context, o.method, request, &cq);
    rpc->StartCall();
    rpc->Finish(&reply, &status, reinterpret_cast<void*>(1));
    void* tag;
    bool ok;
    cq.Next(&tag, &ok);
  };
  for (int i = 0; i < o.warmup; ++i) {
    grpc::Status status;
    call(status);
    if (!status.ok()) {  // the server cannot take these requests: say why and stop everything now
      std::cerr << "loadgen: the warm-up call to " << o.target << o.method << " failed: "
                << code_name(status.error_code()) << " " << status.error_message() << std::endl;
      std::_Exit(1);
    }
  }
  Clock::time_point end;
  {
    std::unique_lock<std::mutex> lock(gate.mu);
    ++gate.warmed;
    gate.cv.notify_all();
    gate.cv.wait(lock, [&] { return gate.open; });
    end = gate.end;
  }
  mine.latencies.reserve(1 << 16);
  for (Clock::time_point t0; (t0 = Clock::now()) < end;) {
    grpc::Status status;
    call(status);
    if (status.ok()) {
      mine.latencies.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    } else {
      ++mine.failures[code_name(status.error_code())];
      if (mine.first_failure.empty()) mine.first_failure = code_name(status.error_code()) + " " + status.error_message();
    }
  }
  cq.Shutdown();
}

double percentile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0.0;
  size_t i = std::min(sorted.size() - 1, static_cast<size_t>(q * sorted.size()));
  return sorted[i] * 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse(argc, argv);
  std::ifstream in(o.request_file, std::ios::binary);
  if (!in) usage("cannot read " + o.request_file);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  grpc::Slice slice(bytes.data(), bytes.size());
  grpc::ByteBuffer request(&slice, 1);

  Gate gate;
  std::vector<Connection> connections(o.connections);
  std::vector<std::thread> threads;
  for (int i = 0; i < o.connections; ++i)
    threads.emplace_back(run, std::cref(o), std::cref(request), i, std::ref(gate), std::ref(connections[i]));
  {
    std::unique_lock<std::mutex> lock(gate.mu);
    gate.cv.wait(lock, [&] { return gate.warmed == o.connections; });
  }
  std::cout << "ready" << std::endl;
  std::string line;
  if (!std::getline(std::cin, line)) {
    std::cerr << "loadgen: stdin closed before go" << std::endl;
    std::_Exit(1);
  }
  double cpu0 = cpu_seconds();
  Clock::time_point start = Clock::now();
  {
    std::lock_guard<std::mutex> lock(gate.mu);
    gate.open = true;
    gate.end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
  }
  gate.cv.notify_all();
  for (auto& t : threads) t.join();
  double wall = std::chrono::duration<double>(Clock::now() - start).count();
  double cpu = cpu_seconds() - cpu0;

  std::vector<double> all;
  std::map<std::string, long> failures;
  std::string first_failure;
  for (auto& c : connections) {
    all.insert(all.end(), c.latencies.begin(), c.latencies.end());
    for (auto& [code, n] : c.failures) failures[code] += n;
    if (first_failure.empty()) first_failure = c.first_failure;
  }
  if (!o.latencies_file.empty()) {
    std::ofstream out(o.latencies_file, std::ios::binary);
    out.write(reinterpret_cast<const char*>(all.data()), static_cast<std::streamsize>(all.size() * sizeof(double)));
    if (!out) usage("cannot write " + o.latencies_file);
  }
  std::sort(all.begin(), all.end());
  std::ostringstream json;
  json.precision(6);
  json << std::fixed << "{\"requests\": " << all.size() << ", \"failures\": {";
  const char* sep = "";
  for (auto& [code, n] : failures) {
    json << sep << json_string(code) << ": " << n;
    sep = ", ";
  }
  json << "}, \"first_failure\": " << (first_failure.empty() ? "null" : json_string(first_failure))
       << ", \"requests_per_s\": " << all.size() / wall << ", \"p50_ms\": " << percentile(all, 0.5)
       << ", \"p90_ms\": " << percentile(all, 0.9) << ", \"p99_ms\": " << percentile(all, 0.99)
       << ", \"max_ms\": " << (all.empty() ? 0.0 : all.back() * 1e3) << ", \"cpu_s\": " << cpu
       << ", \"wall_s\": " << wall << ", \"connections\": " << o.connections << "}";
  std::cout << json.str() << std::endl;
  std::_Exit(0);  // no waiting on gRPC's shutdown: everything is said
}
