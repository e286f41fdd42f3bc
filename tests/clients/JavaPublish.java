// Publishes records as a plain Java application would, with Kafka's own producer
// (org.apache.kafka:kafka-clients, from the local broker's jars), so that the relay is
// tested against the record batches Kafka's reference client writes.
//
// Run by the installed JDK as a single-file program:
//   java -cp "$(deploy/local-kafka/kafka-local classpath)" tests/clients/JavaPublish.java \
//       BOOTSTRAP TOPIC CODEC TRANSACTIONAL_ID_OR_DASH < records
// Each line of standard input is one record: PARTITION <TAB> KEY <TAB> VALUE (the key may
// be empty; the value is one line of text). Records are sent with linger so that several
// share a compressed batch; with a transactional id all of them go in one transaction.
// Prints the number of records acknowledged.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.Future;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class JavaPublish {
    public static void main(String[] args) throws Exception {
        if (args.length != 4) {
            System.err.println("usage: JavaPublish BOOTSTRAP TOPIC CODEC TRANSACTIONAL_ID|-");
            System.exit(2);
        }
        Properties config = new Properties();
        config.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        config.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, args[2]);
        config.put(ProducerConfig.ACKS_CONFIG, "all");
        config.put(ProducerConfig.LINGER_MS_CONFIG, "20");
        config.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        config.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
        boolean transactional = !args[3].equals("-");
        if (transactional) {
            config.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, args[3]);
        }
        BufferedReader input =
            new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(config)) {
            if (transactional) {
                producer.initTransactions();
                producer.beginTransaction();
            }
            List<Future<RecordMetadata>> sent = new ArrayList<>();
            String line;
            while ((line = input.readLine()) != null) {
                if (line.isEmpty()) {
                    continue;
                }
                String[] fields = line.split("\t", 3);
                byte[] key = fields[1].isEmpty() ? null : fields[1].getBytes(StandardCharsets.UTF_8);
                byte[] value = fields[2].getBytes(StandardCharsets.UTF_8);
                sent.add(producer.send(
                    new ProducerRecord<>(args[1], Integer.parseInt(fields[0]), key, value)));
            }
            if (transactional) {
                producer.commitTransaction();
            }
            for (Future<RecordMetadata> each : sent) {
                each.get();
            }
            System.out.println(sent.size());
        }
    }
}
