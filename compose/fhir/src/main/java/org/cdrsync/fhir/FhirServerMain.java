package org.cdrsync.fhir;

import ca.uhn.fhir.rest.server.RestfulServer;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;
import org.springframework.core.env.PropertiesPropertySource;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicReference;

/**
 * Entry point of the local FHIR server: loads the settings, builds the HAPI JPA Spring context (schema, DAOs,
 * providers), and only then opens the HTTP port, so a 200 from /metadata means the server is fully ready.
 *
 * <p>Settings: the file named by -Dfhir.config (see fhir-server.properties), overridden by -D system properties.
 */
public final class FhirServerMain {
	private static final Logger LOG = LoggerFactory.getLogger(FhirServerMain.class);

	private FhirServerMain() {}

	public static void main(String[] args) throws Exception {
		long t0 = System.nanoTime();
		Properties settings = loadSettings();

		AnnotationConfigApplicationContext spring = new AnnotationConfigApplicationContext();
		spring.getEnvironment().getPropertySources().addFirst(new PropertiesPropertySource("cdrsync-fhir", settings));
		spring.register(FhirServerConfig.class);
		// Registered before anything starts, so SIGTERM at any point (even mid start-up) shuts down in order.
		AtomicReference<Server> jettyRef = new AtomicReference<>();
		Runtime.getRuntime().addShutdownHook(new Thread(() -> shutdown(jettyRef.get(), spring), "fhir-shutdown"));
		try {
			spring.refresh();
		} catch (RuntimeException e) {
			LOG.error("FHIR server failed to start", e);
			System.exit(1);
		}

		String host = settings.getProperty("fhir.host", "127.0.0.1");
		int port = Integer.parseInt(settings.getProperty("fhir.port", "8080"));
		String basePath = settings.getProperty("fhir.base-path", "/fhir").replaceAll("/+$", "");

		Server jetty = new Server();
		ServerConnector http = new ServerConnector(jetty);
		http.setHost(host);
		http.setPort(port);
		jetty.addConnector(http);
		ServletContextHandler context = new ServletContextHandler();
		context.setContextPath("/");
		ServletHolder fhirServlet = new ServletHolder("fhir", spring.getBean(RestfulServer.class));
		fhirServlet.setInitOrder(1);
		context.addServlet(fhirServlet, basePath + "/*");
		jetty.setHandler(context);
		jetty.setStopTimeout(10_000);
		jettyRef.set(jetty);
		try {
			jetty.start();
		} catch (Exception e) {
			LOG.error("HTTP server failed to start on {}:{}", host, port, e);
			System.exit(1);
		}
		LOG.info(
				"FHIR R4 server ready at http://{}:{}{} in {} s",
				host,
				port,
				basePath,
				String.format("%.1f", (System.nanoTime() - t0) / 1e9));
		jetty.join();
	}

	private static void shutdown(Server jetty, AnnotationConfigApplicationContext spring) {
		LOG.info("FHIR server stopping");
		if (jetty != null) {
			try {
				jetty.stop();
			} catch (Exception e) {
				LOG.warn("error stopping HTTP server", e);
			}
		}
		// Closes Hibernate, the batch/scheduler threads and the connection pool; H2 closes the database file
		// when its last connection goes (DB_CLOSE_ON_EXIT=FALSE leaves that order to us).
		spring.close();
		LOG.info("FHIR server stopped");
	}

	private static Properties loadSettings() throws IOException {
		Properties settings = new Properties();
		String file = System.getProperty("fhir.config");
		if (file != null && !file.isBlank()) {
			try (InputStream in = Files.newInputStream(Path.of(file))) {
				settings.load(in);
			}
		}
		for (String key : System.getProperties().stringPropertyNames()) {
			if (key.startsWith("fhir.")) {
				settings.setProperty(key, System.getProperty(key));
			}
		}
		return settings;
	}
}
